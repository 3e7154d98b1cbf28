"""Pretrained weights from their public formats into lsvit parameters.

Every source is first renamed into the original JAX ViT ``.npz`` layout
(``Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel`` ...), then per-layer
arrays are stacked into ``Transformer/encoderblock`` and checked key by key
and shape by shape against the model built from the inferred config.

Sources (``--source``):
  hf:<hub id or dir>    Hugging Face ViT/DeiT: model.safetensors or pytorch_model.bin
                        (read with weights_only=True), hub key names or the
                        in-memory names of transformers >= 5.
  timm:<hub id, dir or file>  timm safetensors (vit_*_patch16_*, deit_*distilled*).
  npz:<file>            original JAX ViT checkpoints (e.g. ViT-B_16.npz).

    python -m lsvit.convert --source hf:google/vit-base-patch16-224 --out ckpt/vit_b16
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, Tuple

import numpy as np

from lsvit import model as model_lib

Flat = Dict[str, np.ndarray]
BLOCK = "Transformer/encoderblock_{}/"


class ConversionError(ValueError):
  pass


# ----------------------------------------------------------------------------- reading files

def _read_tensors(path: str) -> Flat:
  if not os.path.isfile(path):
    raise ConversionError(f"no such file: {path}")
  if path.endswith(".safetensors"):
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file
    try:
      with safe_open(path, "np") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
      if dtypes & {"BF16"}:  # numpy has no bfloat16: read through torch
        import torch  # noqa: F401  (a clear ImportError below if it is missing)
        with safe_open(path, "pt") as f:
          return {k: f.get_tensor(k).float().numpy() for k in f.keys()}
      return dict(load_file(path))
    except ImportError:
      raise ConversionError(f"{path} holds bfloat16 tensors, which need PyTorch to read "
                            f"(pip install torch)") from None
    except (SafetensorError, OSError, ValueError) as e:
      raise ConversionError(f"cannot read {path}: {str(e).splitlines()[0]} (a truncated or "
                            f"damaged download? fetch it again)") from None
  if path.endswith((".bin", ".pth", ".pt")):
    try:
      import torch
    except ImportError as e:
      raise ConversionError(f"reading {path} needs PyTorch (pip install torch); "
                            "or convert from a .safetensors file") from e
    import pickle
    try:
      sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except pickle.UnpicklingError:
      raise ConversionError(
          f"{path} holds Python objects besides tensors, which lsvit does not unpickle (that "
          f"could run code). Re-save it as tensors only (a state dict, or safetensors) in an "
          f"environment you trust, then convert that file") from None
    except (RuntimeError, EOFError, OSError) as e:
      raise ConversionError(f"cannot read {path}: {str(e).splitlines()[0][:200]} (a truncated "
                            f"or damaged file? fetch it again)") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
      sd = sd["model"]
    return {k: v.float().numpy() for k, v in sd.items()}
  if path.endswith(".npz"):
    import zipfile
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise ConversionError(f"cannot read {path}: {str(e).splitlines()[0][:200]} (a truncated "
                            f"or damaged file?)") from None
  raise ConversionError(f"don't know how to read {path!r}: expected .safetensors, .bin or .npz")


def _weights_file(directory: str) -> str:
  for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise ConversionError(f"no model.safetensors or pytorch_model.bin in {directory}")


def _hub_download(repo_id: str) -> str:
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.bin"])
  except Exception as e:  # offline, unknown repo, auth ...
    raise ConversionError(
        f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Without internet, download the repository "
        f"elsewhere (huggingface-cli download {repo_id}) and pass its local directory instead, "
        f"e.g. --source hf:/path/to/dir") from None


def _resolve(spec: str) -> Tuple[str, str, dict]:
  """'hf:google/vit-base-patch16-224' -> (kind, weights file, hf config dict)."""
  if ":" not in spec or spec.split(":", 1)[0] not in ("hf", "timm", "npz"):
    raise ConversionError(f"source {spec!r} must start with hf:, timm: or npz: "
                          "(e.g. hf:google/vit-base-patch16-224, npz:ViT-B_16.npz)")
  kind, where = spec.split(":", 1)
  if kind == "npz":
    if not os.path.exists(where):
      raise ConversionError(f"no such file: {where}")
    return kind, where, {}
  if not os.path.exists(where) and _looks_local(where):
    raise ConversionError(f"no such file or directory: {where} (a hub id looks like "
                          f"'org/name', e.g. hf:google/vit-base-patch16-224)")
  if os.path.isfile(where):
    path, directory = where, os.path.dirname(where)
  else:
    directory = where if os.path.isdir(where) else _hub_download(where)
    path = _weights_file(directory)
  cfg_path = os.path.join(directory, "config.json")
  hf_cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
  return kind, path, hf_cfg


def _looks_local(where: str) -> bool:
  """A path rather than a hub id ('org/name'): absolute, relative with ./ or ../, ~, more
  than one '/', or a weights file name."""
  return (where.startswith(("/", ".", "~")) or where.count("/") > 1 or
          where.endswith((".safetensors", ".bin", ".pth", ".pt", ".npz", ".json")) or
          os.sep != "/" and os.sep in where)


# ----------------------------------------------------------------------------- settings

# transformers config fields that do not change a ViT/DeiT classifier's logits: generic
# PretrainedConfig bookkeeping, generation and training options, the unused pooler and the
# masked-image-modelling decoder.
HF_NO_EFFECT = frozenset("""
_name_or_path _num_labels add_cross_attention architectures attention_probs_dropout_prob
attn_implementation _attn_implementation bad_words_ids begin_suppress_tokens bos_token_id
chunk_size_feed_forward cross_attention_hidden_size decoder_start_token_id diversity_penalty
do_sample dtype early_stopping encoder_no_repeat_ngram_size encoder_stride eos_token_id
exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id
gradient_checkpointing hidden_dropout_prob id2label initializer_range is_decoder
is_encoder_decoder label2id length_penalty max_length min_length no_repeat_ngram_size
num_beam_groups num_beams num_labels num_return_sequences output_attentions
output_hidden_states output_scores pad_token_id pooler_act pooler_output_size prefix
problem_type remove_invalid_values repetition_penalty return_dict return_dict_in_generate
sep_token_id suppress_tokens task_specific_params temperature tf_legacy_loss
tie_encoder_decoder tie_word_embeddings tokenizer_class top_k top_p torch_dtype torchscript
transformers_version typical_p use_bfloat16 use_cache use_mask_token use_return_dict
""".split())
# Exact GELU (erf); the tanh approximations ('gelu_new', 'gelu_pytorch_tanh') differ.
HF_EXACT_GELU = ("gelu", "gelu_python")
# Fields the converter reads or checks against the tensors' shapes.
HF_READ = frozenset(("model_type", "hidden_act", "qkv_bias", "layer_norm_eps", "pruned_heads",
                     "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "image_size", "patch_size", "num_channels"))


def check_hf_settings(hf_cfg: dict, where: str) -> None:
  """Refuses a transformers config with a setting lsvit does not implement, naming it."""
  bad = []
  if hf_cfg.get("model_type", "vit") not in ("vit", "deit"):
    bad.append(f"model_type={hf_cfg['model_type']!r} (lsvit implements vit and deit)")
  if hf_cfg.get("hidden_act", "gelu") not in HF_EXACT_GELU:
    bad.append(f"hidden_act={hf_cfg['hidden_act']!r} (lsvit implements the exact GELU, 'gelu')")
  if hf_cfg.get("pruned_heads"):
    bad.append(f"pruned_heads={hf_cfg['pruned_heads']!r} (lsvit has no pruned attention heads)")
  unknown = sorted(set(hf_cfg) - HF_NO_EFFECT - HF_READ)
  bad += [f"{k}={hf_cfg[k]!r} (not a setting lsvit knows; it may change the logits)"
          for k in unknown]
  if bad:
    raise ConversionError(f"{where} has settings lsvit does not implement, so the converted "
                          f"model would compute something else: " + "; ".join(bad))


def check_hf_shapes(hf_cfg: dict, cfg: dict, where: str) -> None:
  """The config's dimensions must be the ones the tensors have."""
  pairs = (("hidden_size", "width"), ("num_hidden_layers", "depth"),
           ("intermediate_size", "mlp_dim"), ("num_attention_heads", "num_heads"),
           ("image_size", "image_size"), ("patch_size", "patch_size"),
           ("num_channels", "channels"))
  bad = [f"{h}={hf_cfg[h]} but the tensors give {cfg[o]}" for h, o in pairs
         if h in hf_cfg and int(hf_cfg[h]) != int(cfg[o])]
  if bad:
    raise ConversionError(f"{where} does not match its weights: " + "; ".join(bad))


TIMM_ARCH = re.compile(r"(vit|deit)_(tiny|small|base|large|huge)_(distilled_)?patch\d+_\d+")
# timm model arguments and the value that is lsvit's computation.
TIMM_ARGS = {"global_pool": "token", "class_token": True, "no_embed_class": False,
             "reg_tokens": 0, "pre_norm": False, "fc_norm": None, "qk_norm": False,
             "init_values": None, "act_layer": None, "final_norm": True, "qkv_bias": True,
             "dynamic_img_size": False, "pos_embed": "learn", "mlp_ratio": None}


def check_timm_settings(timm_cfg: dict, where: str) -> None:
  """Refuses a timm model whose architecture or arguments lsvit does not implement."""
  bad = []
  arch = timm_cfg.get("architecture", "")
  if arch and not TIMM_ARCH.fullmatch(arch.split(".")[0]):
    bad.append(
        f"architecture={arch!r} (lsvit implements plain vit_*/deit_* models such as "
        f"vit_base_patch16_224; not CLIP, SigLIP, registers, pooling or LayerScale variants)")
  args = dict(timm_cfg.get("model_args") or {})
  if "global_pool" in timm_cfg:
    args.setdefault("global_pool", timm_cfg["global_pool"])
  for k, v in sorted(args.items()):
    if k in TIMM_ARGS and TIMM_ARGS[k] is not None and v != TIMM_ARGS[k]:
      bad.append(f"{k}={v!r} (lsvit computes {k}={TIMM_ARGS[k]!r})")
    elif k in ("fc_norm", "act_layer", "init_values") and v not in (None, False, "gelu"):
      bad.append(f"{k}={v!r} (not implemented)")
  if bad:
    raise ConversionError(f"{where} describes a model lsvit does not implement: " + "; ".join(bad))


# ----------------------------------------------------------------------------- renaming

def _linear(flat, out, w, b, kernel_shape=None, bias_shape=None):
  if w is not None:  # a missing tensor is reported, with all others, by stack()
    kernel = np.asarray(w).T
    flat[out + "kernel"] = (kernel.reshape(kernel_shape)
                            if kernel_shape and kernel.size == np.prod(kernel_shape) else kernel)
  if b is not None:
    b = np.asarray(b)
    flat[out +
         "bias"] = b.reshape(bias_shape) if bias_shape and b.size == np.prod(bias_shape) else b


_HF_V5 = [  # transformers >= 5 in-memory names -> names stored on the hub
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
]


def from_hf(sd: Flat, num_heads: int) -> Flat:
  """HF ViT/DeiT state dict -> npz layout. Unused keys are returned under 'unexpected/'."""
  src = {}
  for k, v in sd.items():
    k = re.sub(r"^(vit|deit)\.", "", k)
    for pat, rep in _HF_V5:
      k, n = re.subn(pat, rep, k)
      if n:
        break
    src[k] = v
  flat: Flat = {}
  take = lambda k: src.pop(k, None)
  d = src["embeddings.cls_token"].shape[-1]
  hd = d // num_heads
  flat["cls"] = take("embeddings.cls_token")
  if "embeddings.distillation_token" in src:
    flat["dist"] = take("embeddings.distillation_token")
  flat["Transformer/posembed_input/pos_embedding"] = take("embeddings.position_embeddings")
  w = take("embeddings.patch_embeddings.projection.weight")
  flat["embedding/kernel"] = None if w is None else np.transpose(w, (2, 3, 1, 0))
  flat["embedding/bias"] = take("embeddings.patch_embeddings.projection.bias")
  layers = sorted(
      {int(m.group(1)) for k in src for m in [re.match(r"encoder\.layer\.(\d+)\.", k)] if m})
  for l in layers:
    p, o = f"encoder.layer.{l}.", BLOCK.format(l)
    for ln_src, ln_dst in (("layernorm_before", "LayerNorm_0"), ("layernorm_after", "LayerNorm_2")):
      flat[o + ln_dst + "/scale"] = take(p + ln_src + ".weight")
      flat[o + ln_dst + "/bias"] = take(p + ln_src + ".bias")
    for name in ("query", "key", "value"):
      _linear(flat, o + f"MultiHeadDotProductAttention_1/{name}/",
              take(p + f"attention.attention.{name}.weight"),
              src.pop(p + f"attention.attention.{name}.bias", None), (d, num_heads, hd),
              (num_heads, hd))
    _linear(flat, o + "MultiHeadDotProductAttention_1/out/",
            take(p + "attention.output.dense.weight"), take(p + "attention.output.dense.bias"),
            (num_heads, hd, d))
    _linear(flat, o + "MlpBlock_3/Dense_0/", take(p + "intermediate.dense.weight"),
            take(p + "intermediate.dense.bias"))
    _linear(flat, o + "MlpBlock_3/Dense_1/", take(p + "output.dense.weight"),
            take(p + "output.dense.bias"))
  flat["Transformer/encoder_norm/scale"] = take("layernorm.weight")
  flat["Transformer/encoder_norm/bias"] = take("layernorm.bias")
  for head_src, head_dst in (("classifier", "head"), ("cls_classifier", "head"),
                             ("distillation_classifier", "head_dist")):
    if head_src + ".weight" in src:
      _linear(flat, head_dst + "/", take(head_src + ".weight"), take(head_src + ".bias"))
  for k in [k for k in src if k.startswith("pooler.")]:
    src.pop(k)  # ViTModel's pooler is not used by the image classifier (as in HF).
  flat.update({"unexpected/" + k: v for k, v in src.items()})
  return {k: v for k, v in flat.items() if v is not None}


def from_timm(sd: Flat, num_heads: int) -> Flat:
  """timm VisionTransformer / DistilledVisionTransformer -> npz layout."""
  src = dict(sd)
  take = lambda k: src.pop(k, None)
  flat: Flat = {}
  d = src["cls_token"].shape[-1]
  hd = d // num_heads
  flat["cls"] = take("cls_token")
  if "dist_token" in src:
    flat["dist"] = take("dist_token")
  flat["Transformer/posembed_input/pos_embedding"] = take("pos_embed")
  w = take("patch_embed.proj.weight")
  flat["embedding/kernel"] = None if w is None else np.transpose(w, (2, 3, 1, 0))
  flat["embedding/bias"] = take("patch_embed.proj.bias")
  layers = sorted({int(m.group(1)) for k in src for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
  for l in layers:
    p, o = f"blocks.{l}.", BLOCK.format(l)
    for ln_src, ln_dst in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      flat[o + ln_dst + "/scale"] = take(p + ln_src + ".weight")
      flat[o + ln_dst + "/bias"] = take(p + ln_src + ".bias")
    w, b = take(p + "attn.qkv.weight"), take(p + "attn.qkv.bias")
    qkv_w = [None] * 3 if w is None else np.split(w, 3, axis=0)
    qkv_b = [None] * 3 if b is None else np.split(b, 3, axis=0)
    for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b):
      _linear(flat, o + f"MultiHeadDotProductAttention_1/{name}/", w, b, (d, num_heads, hd),
              (num_heads, hd))
    _linear(flat, o + "MultiHeadDotProductAttention_1/out/", take(p + "attn.proj.weight"),
            take(p + "attn.proj.bias"), (num_heads, hd, d))
    _linear(flat, o + "MlpBlock_3/Dense_0/", take(p + "mlp.fc1.weight"), take(p + "mlp.fc1.bias"))
    _linear(flat, o + "MlpBlock_3/Dense_1/", take(p + "mlp.fc2.weight"), take(p + "mlp.fc2.bias"))
  flat["Transformer/encoder_norm/scale"] = take("norm.weight")
  flat["Transformer/encoder_norm/bias"] = take("norm.bias")
  for name in ("head", "head_dist"):
    if name + ".weight" in src:
      _linear(flat, name + "/", take(name + ".weight"), take(name + ".bias"))
  flat.update({"unexpected/" + k: v for k, v in src.items()})
  return {k: v for k, v in flat.items() if v is not None}


def _zero_qkv_bias(flat: Flat, heads: int):
  for k in [
      k for k in flat if re.fullmatch(
          r"Transformer/encoderblock_\d+/"
          r"MultiHeadDotProductAttention_1/(query|key|value)/kernel", k)
  ]:
    bias = k[:-len("kernel")] + "bias"
    if bias in flat:
      raise ConversionError(f"config.json says qkv_bias=false but the weights have {bias}")
    flat[bias] = np.zeros((heads, flat[k].shape[-1]), np.float32)


# ----------------------------------------------------------------------------- stacking & checking

def _infer_config(flat: Flat, ln_eps: float = 1e-6) -> dict:
  """The model's fields, read off the tensors' shapes."""
  kernel = flat["embedding/kernel"]
  patch, _, channels, width = kernel.shape
  distilled = "dist" in flat
  tokens = flat["Transformer/posembed_input/pos_embedding"].shape[1] - (2 if distilled else 1)
  grid = int(round(np.sqrt(tokens)))
  depth = len(
      {m.group(1) for k in flat for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m})
  mlp = _layer_dim(flat, "MlpBlock_3/Dense_0/kernel", -1)
  heads = _layer_dim(flat, "MultiHeadDotProductAttention_1/query/kernel", 1)
  head = flat.get("head/kernel")
  cfg = dict(num_classes=int(head.shape[-1]) if head is not None else 1000,
             image_size=int(grid * patch), channels=int(channels), patch_size=int(patch),
             width=int(width), depth=depth, mlp_dim=int(mlp), num_heads=int(heads),
             distilled=distilled, ln_eps=float(ln_eps))
  if distilled and "head_dist/kernel" not in flat:  # DeiTForImageClassification: one head
    cfg["deit_head"] = "cls"
  return cfg


def _layer_dim(flat, name, axis):
  """A dimension read from the first layer that has ``name`` (most common value)."""
  dims = [v.shape[axis] for k, v in flat.items()
          if re.fullmatch(r"Transformer/encoderblock_\d+/" + name, k) and v.ndim > abs(axis)]
  if not dims:
    raise ConversionError(f"no layer has {name}: is this a ViT checkpoint?")
  return max(set(dims), key=dims.count)


def _heads_for(width: int, hf_cfg: dict, num_heads=None) -> int:
  if num_heads:
    return int(num_heads)
  if hf_cfg.get("num_attention_heads"):
    return int(hf_cfg["num_attention_heads"])
  if (hf_cfg.get("model_args") or {}).get("num_heads"):  # timm's hub config of a custom size
    return int(hf_cfg["model_args"]["num_heads"])
  arch = re.match(r"(?:vit|deit)_(tiny|small|base|large|huge)_", hf_cfg.get("architecture", ""))
  if arch:  # timm's config.json names the architecture, e.g. vit_base_patch16_224
    return {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}[arch.group(1)]
  for w, _, _, h in model_lib.SIZES.values():
    if w == width:
      return h
  raise ConversionError(f"cannot infer the number of heads for width {width}; pass num_heads")


def stack(flat: Flat, expected) -> dict:
  """npz-layout flat dict -> lsvit param tree, checked against ``expected`` shapes."""
  unexpected = sorted(k[len("unexpected/"):] for k in flat if k.startswith("unexpected/"))
  flat = {k: v for k, v in flat.items() if not k.startswith("unexpected/")}
  top = {"embedding/kernel": "embedding/kernel", "embedding/bias": "embedding/bias",
         "cls": "cls", "dist": "dist", "Transformer/posembed_input/pos_embedding": "pos_embedding",
         "Transformer/encoder_norm/scale": "encoder_norm/scale",
         "Transformer/encoder_norm/bias": "encoder_norm/bias",
         "head/kernel": "head/kernel", "head/bias": "head/bias",
         "head_dist/kernel": "head_dist/kernel", "head_dist/bias": "head_dist/bias"}
  out: Flat = {}
  per_layer: Dict[str, Dict[int, np.ndarray]] = {}
  for k, v in flat.items():
    m = re.match(r"Transformer/encoderblock_(\d+)/(.*)", k)
    if m:
      per_layer.setdefault(m.group(2), {})[int(m.group(1))] = v
    elif k in top:
      out[top[k]] = v
    else:
      unexpected.append(k)
  want = _flatten(expected)
  missing, shapes = [], []
  all_layers = sorted(set().union(*[set(v) for v in per_layer.values()])) if per_layer else []
  for name, layers in per_layer.items():
    key = "Transformer/encoderblock/" + name
    gaps = [l for l in all_layers if l not in layers]
    missing += [f"Transformer/encoderblock_{l}/{name}" for l in gaps]
    bad = [f"Transformer/encoderblock_{l}/{name}: checkpoint {tuple(v.shape)} vs model "
           f"{tuple(want[key].shape[1:])}" for l, v in sorted(layers.items())
           if key in want and tuple(v.shape) != tuple(want[key].shape[1:])]
    shapes += bad
    if not gaps and not bad:
      out[key] = np.stack([layers[l] for l in all_layers])
    elif key in want:
      out[key] = want[key]  # reported above; keeps it out of the generic lists below
  missing += sorted(set(want) - set(out))
  unexpected += sorted(set(out) - set(want))
  shapes += [f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(want[k].shape)}"
            for k in sorted(set(want) & set(out)) if tuple(out[k].shape) != tuple(want[k].shape)]
  if missing or unexpected or shapes:
    msg = ["checkpoint does not match the model:"]
    if missing:
      msg.append(f"  missing keys ({len(missing)}): {missing}")
    if unexpected:
      msg.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
    if shapes:
      msg.append(f"  wrong shapes ({len(shapes)}): " + "; ".join(shapes))
    raise ConversionError("\n".join(msg))
  return _unflatten({k: np.asarray(v, np.float32) for k, v in out.items()})


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _unflatten(flat):
  tree: dict = {}
  for k, v in flat.items():
    node = tree
    *parents, leaf = k.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def load(source: str, num_heads=None) -> Tuple[dict, dict]:
  """Reads a pretrained checkpoint. Returns (params, model config dict)."""
  kind, path, hf_cfg = _resolve(source)
  sd = _read_tensors(path)
  if kind == "npz":
    flat, eps = dict(sd), 1e-6
  else:
    try:
      width = next(v for k, v in sd.items() if k.endswith(("cls_token",))).shape[-1]
    except StopIteration:
      raise ConversionError(f"{path} has no class token: is it a ViT/DeiT checkpoint?") from None
    heads = _heads_for(width, hf_cfg, num_heads)
    where = os.path.join(os.path.dirname(path), "config.json")
    if kind == "hf":
      check_hf_settings(hf_cfg, where)
    else:
      check_timm_settings(hf_cfg, where)
    try:
      if kind == "hf":
        flat, eps = from_hf(sd, heads), float(hf_cfg.get("layer_norm_eps", 1e-12))
        if not hf_cfg.get("qkv_bias", True):  # no q/k/v bias is a zero bias
          _zero_qkv_bias(flat, heads)
      else:
        flat, eps = from_timm(sd, heads), 1e-6
    except KeyError as e:
      raise ConversionError(
          f"{path} is missing key {e.args[0]!r} expected in a {kind} ViT checkpoint")
  cfg = _infer_config(flat, ln_eps=eps)
  if kind == "hf":
    check_hf_shapes(hf_cfg, cfg, os.path.join(os.path.dirname(path), "config.json"))
  expected = model_lib.param_shapes(model_lib.build(cfg))
  return stack(flat, expected), cfg


# ----------------------------------------------------------------------------- adapting

def resize_pos_embedding(pos: np.ndarray, num_prefix: int, new_grid: int) -> np.ndarray:
  """Bicubic resize of the patch part of a [1, prefix + g*g, D] position embedding."""
  import jax
  prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
  g = int(round(np.sqrt(grid.shape[1])))
  if g == new_grid:
    return pos
  grid = grid.reshape(g, g, -1)
  grid = np.asarray(jax.image.resize(grid, (new_grid, new_grid, grid.shape[-1]), "bicubic"))
  return np.concatenate([prefix, grid.reshape(1, new_grid * new_grid, -1)], axis=1)


def adapt(params: dict, init: dict, model: "model_lib.ViT", keep_layers=None,
          keep_method: str = "first") -> dict:
  """Fits pretrained ``params`` to ``model``: fresh head if the class count differs,
  resized position embedding if the image size differs, k of the layers kept, and the
  variant's extra parameters (position/predict) taken from ``init``."""
  params = _flatten(params)
  init = _flatten(init)
  out = {}
  prefix = 2 if model.distilled else 1
  # The authors' DeiTForImageClassification on a distilled checkpoint: a fresh class-token head
  # (the checkpoint's heads are named for the two-head model and are not loaded).
  fresh_head = model.distilled and model.deit_head == "cls" and "head_dist/kernel" in params
  stacked = params["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
  if keep_layers:
    if not 1 <= keep_layers <= stacked:
      raise ValueError(f"keep_layers={keep_layers} but the checkpoint has {stacked} layers")
    if keep_method == "first":
      kept = np.arange(keep_layers)
    elif keep_method == "even":
      kept = np.round(np.linspace(0, stacked - 1, keep_layers)).astype(int)
    else:
      raise ValueError(f"unknown keep_method {keep_method!r}: first or even")
  for k, want in init.items():
    if k not in params:
      out[k] = want  # variant-specific parameters start from their initialisation
      continue
    v = np.asarray(params[k])
    if k.startswith("Transformer/encoderblock/") and keep_layers:
      v = v[kept]
    if k == "pos_embedding" and v.shape != want.shape:
      v = resize_pos_embedding(v, prefix, model.image_size // model.patch_size)
    if k.startswith(("head/", "head_dist/")) and (v.shape != want.shape or fresh_head):
      v = np.asarray(want)  # new task: the head is re-initialised (zeros by default)
    if v.shape != want.shape:
      raise ValueError(f"pretrained {k} has shape {v.shape}, model wants {want.shape}: "
                       "width, depth, patch size and heads must match the checkpoint")
    out[k] = v
  return _unflatten(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--source", required=True, help="hf:<id|dir>, timm:<id|dir|file> or npz:<file>")
  ap.add_argument("--out", required=True, help="new directory for the Orbax checkpoint")
  ap.add_argument("--num_classes", type=int, help="new head size (re-initialised)")
  ap.add_argument("--image_size", type=int, help="resize the position embedding")
  ap.add_argument("--num_heads", type=int, help="override, when it cannot be inferred")
  args = ap.parse_args(argv)
  from lsvit import checkpoint
  try:
    checkpoint.refuse_existing(args.out)
    params, cfg = load(args.source, args.num_heads)
    if args.num_classes or args.image_size:
      cfg.update({k: v for k, v in (("num_classes", args.num_classes),
                                    ("image_size", args.image_size)) if v})
      m = model_lib.build(cfg)
      params = adapt(params, model_lib.init_params(m), m)
    checkpoint.save_params(args.out, params, cfg, source=args.source)
  except (ConversionError, ValueError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = sum(np.size(x) for x in _flatten(params).values())
  print(f"wrote {args.out}: {n / 1e6:.1f}M parameters, model {json.dumps(cfg)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
