"""A trained lsvit model out to `transformers` or timm: the inverse of ``lsvit.convert``.

  python -m lsvit.export --workdir runs/digits_layershuffle_seed0 --to hf --out export/digits_hf
  python -m lsvit.export --workdir ckpt/vit_b16 --to timm --out export/vit_timm

``hf`` writes a directory ``from_pretrained`` loads: ``config.json`` (every setting that
decides the logits), ``model.safetensors`` (the names stored on the hub),
``preprocessor_config.json`` (the run's preprocessing) and a ``README.md`` model card. ``timm``
writes ``model.safetensors`` under timm's VisionTransformer names and a ``config.json`` with
the architecture and model arguments, which ``lsvit.convert --source timm:DIR`` (or timm's own
hub loader) reads back. Parameters a plain ViT lacks (variants ``predict``/``position``) go to
``lsvit_extra.safetensors`` and the card says what they are; a model whose logits need them
(``position``) is refused unless ``--partial`` says a partial model is wanted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional, Tuple

import numpy as np

from lsvit import checkpoint as ckpt_lib
from lsvit import convert
from lsvit import data as data_lib
from lsvit import model as model_lib
from lsvit import order as order_lib

Flat = Dict[str, np.ndarray]
DEIT_HEADS = model_lib.DEIT_HEADS  # DeiT: the mean of both heads, or the class-token head
EXTRA_FILE = "lsvit_extra.safetensors"
# timm's size names by width (its ViT table), for the architecture name in config.json
TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
TIMM_LN_EPS = 1e-6  # timm's VisionTransformer LayerNorm


class ExportError(ValueError):
  pass


# ----------------------------------------------------------------------------- reading

def read_source(path: str) -> Tuple[dict, dict, dict]:
  """(params, model cfg, run facts) of a training workdir (its best checkpoint) or a converted
  checkpoint; run facts: the saved config and summary, empty for a converted checkpoint."""
  if not os.path.isdir(path):
    raise ExportError(f"{path} does not exist: give a training workdir or a converted checkpoint")
  if os.path.exists(os.path.join(path, "config.json")):  # a training workdir
    best = os.path.join(path, "best")
    if not os.path.isdir(best) or not os.listdir(best):
      raise ExportError(f"{path} has no best checkpoint (best/ is missing or empty): finish at "
                        f"least one epoch of training before exporting")
    params, meta = ckpt_lib.restore_best(path)
    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
    summary = {}
    if os.path.exists(os.path.join(path, "summary.json")):
      with open(os.path.join(path, "summary.json")) as f:
        summary = json.load(f)
    return _host(params), ckpt_lib.load_model_cfg(path), {"config": config, "summary": summary,
                                                          "best": meta}
  params, cfg = ckpt_lib.load_params(path)
  return _host(params), cfg, {}


def _host(tree):
  return {k: _host(v) if hasattr(v, "items") else np.asarray(v, np.float32)
          for k, v in tree.items()}


# ----------------------------------------------------------------------------- layouts

def _dims(cfg: dict) -> Tuple[int, int, int]:
  return cfg["width"], cfg["num_heads"], cfg["width"] // cfg["num_heads"]


def _linear_out(kernel: np.ndarray, width: Optional[int] = None) -> np.ndarray:
  """Flax kernel [in, ..., out] -> torch Linear weight [out, in]."""
  k = np.asarray(kernel)
  if width is not None:  # attention: [D, H, hd] (q/k/v) or [H, hd, D] (out)
    k = k.reshape(width, -1) if k.shape[0] == width else k.reshape(-1, k.shape[-1])
  return np.ascontiguousarray(k.T)


def _layers(params: dict):
  """Each encoder layer's parameters, in the stack's order (``model.unstack``'s layout)."""
  enc = model_lib.unstack(params)["Transformer"]
  depth = np.asarray(params["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"]).shape[0]
  return [enc[f"encoderblock_{l}"] for l in range(depth)]


def _layer_norms(sd: Flat, prefix: str, blk: dict, before: str, after: str):
  """A block's two LayerNorms (before attention, before the MLP) under torch's names."""
  for ours, theirs in (("LayerNorm_0", before), ("LayerNorm_2", after)):
    sd[prefix + theirs + ".weight"] = blk[ours]["scale"]
    sd[prefix + theirs + ".bias"] = blk[ours]["bias"]


def hf_state_dict(params: dict, cfg: dict, deit_head: Optional[str] = None) -> Flat:
  """The names ``save_pretrained`` stores on the hub, for ViTForImageClassification or, when
  distilled, DeiTForImageClassificationWithTeacher (``mean``) / DeiTForImageClassification
  (``cls``); ``None``: the head the model was trained with."""
  deit_head = deit_head or cfg.get("deit_head", "mean")
  d, h, _ = _dims(cfg)
  p = "deit." if cfg["distilled"] else "vit."
  sd = {p + "embeddings.cls_token": params["cls"],
        p + "embeddings.position_embeddings": params["pos_embedding"],
        p + "embeddings.patch_embeddings.projection.weight":
            np.transpose(params["embedding"]["kernel"], (3, 2, 0, 1)),
        p + "embeddings.patch_embeddings.projection.bias": params["embedding"]["bias"],
        p + "layernorm.weight": params["encoder_norm"]["scale"],
        p + "layernorm.bias": params["encoder_norm"]["bias"]}
  if cfg["distilled"]:
    sd[p + "embeddings.distillation_token"] = params["dist"]
  for l, blk in enumerate(_layers(params)):
    o = f"{p}encoder.layer.{l}."
    _layer_norms(sd, o, blk, "layernorm_before", "layernorm_after")
    att = blk["MultiHeadDotProductAttention_1"]
    for name in ("query", "key", "value"):
      sd[o + f"attention.attention.{name}.weight"] = _linear_out(att[name]["kernel"], d)
      sd[o + f"attention.attention.{name}.bias"] = att[name]["bias"].reshape(d)
    sd[o + "attention.output.dense.weight"] = _linear_out(att["out"]["kernel"], d)
    sd[o + "attention.output.dense.bias"] = att["out"]["bias"]
    mlp = blk["MlpBlock_3"]
    sd[o + "intermediate.dense.weight"] = _linear_out(mlp["Dense_0"]["kernel"])
    sd[o + "intermediate.dense.bias"] = mlp["Dense_0"]["bias"]
    sd[o + "output.dense.weight"] = _linear_out(mlp["Dense_1"]["kernel"])
    sd[o + "output.dense.bias"] = mlp["Dense_1"]["bias"]
  heads = [("head", "classifier")]
  if cfg["distilled"] and deit_head == "mean":
    heads = [("head", "cls_classifier"), ("head_dist", "distillation_classifier")]
  for ours, theirs in heads:
    sd[theirs + ".weight"] = _linear_out(params[ours]["kernel"])
    sd[theirs + ".bias"] = params[ours]["bias"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def hf_architecture(cfg: dict, deit_head: Optional[str] = None) -> str:
  deit_head = deit_head or cfg.get("deit_head", "mean")
  if not cfg["distilled"]:
    return "ViTForImageClassification"
  return ("DeiTForImageClassificationWithTeacher" if deit_head == "mean"
          else "DeiTForImageClassification")


def hf_config(cfg: dict, labels, deit_head: Optional[str] = None) -> dict:
  """Every field that decides the logits, stated (transformers' defaults are not relied on)."""
  deit_head = deit_head or cfg.get("deit_head", "mean")
  return {
      "architectures": [hf_architecture(cfg, deit_head)],
      "model_type": "deit" if cfg["distilled"] else "vit",
      "hidden_size": cfg["width"], "num_hidden_layers": cfg["depth"],
      "num_attention_heads": cfg["num_heads"], "intermediate_size": cfg["mlp_dim"],
      "hidden_act": "gelu",  # exact (erf) GELU, as lsvit computes
      "hidden_dropout_prob": cfg["dropout"], "attention_probs_dropout_prob": cfg["attn_dropout"],
      "layer_norm_eps": cfg["ln_eps"], "image_size": cfg["image_size"],
      "patch_size": cfg["patch_size"], "num_channels": cfg["channels"], "qkv_bias": True,
      "id2label": {str(i): name for i, name in enumerate(labels)},
      "label2id": {name: i for i, name in enumerate(labels)},
      "torch_dtype": "float32",
  }


def preprocessor_config(kind: str, cfg: dict) -> dict:
  """The image processor that computes what ``data.Preprocess(kind)`` computes."""
  size, channels = cfg["image_size"], cfg["channels"]
  base = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}
  if kind == "deit":  # resize to 256/224 of the size (bicubic), centre crop
    big = int(round(size * 256 / 224))
    return {"image_processor_type": "DeiTImageProcessor", "do_resize": True,
            "size": {"height": big, "width": big}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, **base,
            "image_mean": list(data_lib.IMAGENET_MEAN[:channels]),
            "image_std": list(data_lib.IMAGENET_STD[:channels])}
  if kind in ("vit_center", "deit_center"):  # shorter side to the size (bilinear), centre crop
    mean, std = ((data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD) if kind == "deit_center"
                 else ((0.5,) * 3, (0.5,) * 3))
    return {"image_processor_type": "DeiTImageProcessor", "do_resize": True,
            "size": {"shortest_edge": size}, "resample": 2, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, **base,
            "image_mean": list(mean[:channels]), "image_std": list(std[:channels])}
  if kind in ("vit", "plain"):  # resize (bilinear) to the model's size, mean = std = 0.5
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": size, "width": size}, "resample": 2, **base,
            "image_mean": [0.5] * channels, "image_std": [0.5] * channels}
  raise ExportError(f"no image processor for preprocessing {kind!r}")


def timm_state_dict(params: dict, cfg: dict) -> Flat:
  """timm's VisionTransformer / DistilledVisionTransformer names (fused qkv)."""
  d, _, _ = _dims(cfg)
  sd = {"cls_token": params["cls"], "pos_embed": params["pos_embedding"],
        "patch_embed.proj.weight": np.transpose(params["embedding"]["kernel"], (3, 2, 0, 1)),
        "patch_embed.proj.bias": params["embedding"]["bias"],
        "norm.weight": params["encoder_norm"]["scale"], "norm.bias": params["encoder_norm"]["bias"],
        "head.weight": _linear_out(params["head"]["kernel"]), "head.bias": params["head"]["bias"]}
  if cfg["distilled"]:
    sd.update({"dist_token": params["dist"],
               "head_dist.weight": _linear_out(params["head_dist"]["kernel"]),
               "head_dist.bias": params["head_dist"]["bias"]})
  for l, blk in enumerate(_layers(params)):
    o = f"blocks.{l}."
    _layer_norms(sd, o, blk, "norm1", "norm2")
    att = blk["MultiHeadDotProductAttention_1"]
    sd[o + "attn.qkv.weight"] = np.concatenate(
        [_linear_out(att[n]["kernel"], d) for n in ("query", "key", "value")])
    sd[o + "attn.qkv.bias"] = np.concatenate(
        [att[n]["bias"].reshape(d) for n in ("query", "key", "value")])
    sd[o + "attn.proj.weight"] = _linear_out(att["out"]["kernel"], d)
    sd[o + "attn.proj.bias"] = att["out"]["bias"]
    for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      sd[o + f"mlp.{theirs}.weight"] = _linear_out(blk["MlpBlock_3"][ours]["kernel"])
      sd[o + f"mlp.{theirs}.bias"] = blk["MlpBlock_3"][ours]["bias"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def timm_config(cfg: dict, labels) -> dict:
  """timm's hub config: an architecture and the model arguments that give these shapes."""
  name = "deit" if cfg["distilled"] else "vit"
  # the size with this width, else the largest narrower one (model_args give the shapes)
  size = TIMM_SIZES[max([w for w in TIMM_SIZES if w <= cfg["width"]], default=192)]
  arch = (f"{name}_{size}_{'distilled_' if cfg['distilled'] else ''}patch{cfg['patch_size']}_"
          f"{cfg['image_size']}")
  return {"architecture": arch, "num_classes": len(labels), "num_features": cfg["width"],
          "global_pool": "token", "label_names": list(labels),
          "model_args": {"embed_dim": cfg["width"], "depth": cfg["depth"],
                         "num_heads": cfg["num_heads"], "mlp_ratio": cfg["mlp_dim"] / cfg["width"],
                         "patch_size": cfg["patch_size"], "img_size": cfg["image_size"],
                         "in_chans": cfg["channels"], "num_classes": len(labels),
                         "global_pool": "token", "class_token": True, "qkv_bias": True}}


# Parameters of the LayerShuffle variants that a plain ViT does not have, and what they do.
EXTRAS = {
    "Transformer/layer_pos_embedding": "position: the shared table of layer-position embeddings",
    "Transformer/encoderblock/pos_table": "position: each layer's own position table",
    "Transformer/encoderblock/PositionProj_LayerNorm": "position: per-layer projection of "
                                                      "[x, position embedding] (LayerNorm)",
    "Transformer/encoderblock/PositionProj_Dense": "position: per-layer projection (Dense)",
    "Transformer/encoderblock/PositionHead_LayerNorm": "predict: per-layer position head "
                                                       "(LayerNorm)",
    "Transformer/encoderblock/PositionHead_Dense": "predict: per-layer position head (Dense)",
}


def extras(params: dict) -> Flat:
  """The variant-only parameters, flat under EXTRAS' names (arrays stacked on the layer axis)."""
  out: Flat = {}
  for key in EXTRAS:
    node = params
    for part in key.split("/"):
      node = node.get(part) if hasattr(node, "get") else None
      if node is None:
        break
    if node is not None:
      for sub, v in (convert._flatten(node).items() if hasattr(node, "items")
                     else [("", node)]):
        out[key + ("/" + sub if sub else "")] = np.ascontiguousarray(v, np.float32)
  return out


# ----------------------------------------------------------------------------- the card

def _labels(facts: dict, num_classes: int, log) -> list:
  config = facts.get("config")
  if config:
    from ml_collections import ConfigDict
    try:
      src = data_lib.get_source(ConfigDict(config["data"]), config["data"]["train_split"])
      names = getattr(src, "class_names", None)
      if names and len(names) == num_classes:
        return [str(n) for n in names]
    except data_lib.DataError as e:
      log(f"note: class names not read ({str(e).splitlines()[0]}); labels are LABEL_<i>")
  return [f"LABEL_{i}" for i in range(num_classes)]


def _pct(m: dict, key: str) -> str:
  return f"{100 * m[key]:.2f} %" if key in m else "–"


def model_card(cfg: dict, facts: dict, to: str, deit_head: str, partial: list,
               extra_keys: list) -> str:
  config, summary = facts.get("config") or {}, facts.get("summary") or {}
  variant = cfg["variant"]
  shuffled = variant in order_lib.SHUFFLED_VARIANTS
  base = config.get("init_from") or "trained from scratch"
  data = config.get("data", {}).get("name", "unknown")
  arch = hf_architecture(cfg, deit_head)
  how = "trained in random layer orders" if shuffled else "trained in the original order"
  lines = [
      "---", "library_name: transformers", "pipeline_tag: image-classification",
      "tags:", "- layershuffle", "- vision-transformer", "- lsvit", "---", "",
      f"# LayerShuffle {'DeiT' if cfg['distilled'] else 'ViT'} ({variant}), exported by lsvit", "",
      "**LayerShuffle** refines a vision transformer while running its layers in a fresh random "
      "order for every training batch, so that the model still works when its layers run in any "
      "order, are pruned, or come from other independently trained models (*LayerShuffle*, "
      "Sec. 3). A normally trained ViT collapses to chance when its layers are shuffled.", "",
      "| | |", "|---|---|",
      f"| variant | `{variant}` ({how}) |",
      f"| base model | {base} |",
      f"| data | {data} |",
      f"| architecture | {cfg['depth']} layers, width {cfg['width']}, {cfg['num_heads']} heads, "
      f"patch {cfg['patch_size']}, {cfg['image_size']} px, {cfg['channels']} channels, "
      f"LayerNorm ε {cfg['ln_eps']:g} |",
      f"| transformers class | `{arch}` |" if to == "hf" else "| format | timm VisionTransformer |",
  ]
  if config:
    lines.append(f"| training | {config['num_epochs']} epochs, batch {config['batch_size']}, lr "
                 f"{config['optimizer']['lr']:g}, seed {config['seed']} |")
  lines.append("")
  if summary:
    seq, arb = summary.get("sequential", {}), summary.get("arbitrary", {})
    lines += ["## Accuracy of this checkpoint (lsvit's evaluation, validation split)", "",
              "| layer order | top-1 | top-5 |", "|---|---|---|",
              f"| original (sequential) | {_pct(seq, 'top1')} | {_pct(seq, 'top5')} |",
              f"| arbitrary (a fresh random order for every batch, {arb.get('orders', '?')} "
              f"orders) | {_pct(arb, 'top1')} | {_pct(arb, 'top5')} |", ""]
  else:
    lines += ["No evaluation is stored with this checkpoint (a converted model, not a run).", ""]
  if cfg["distilled"] and to == "hf":
    lines += [("The logits are the mean of the class-token and distillation-token heads, as "
               "lsvit trained and evaluated them.") if deit_head == "mean" else
              "The logits are the class-token head's alone" +
              (", as lsvit trained and evaluated them." if cfg.get("deit_head") == "cls" else
               " (exported with `--deit_head cls`), not the mean of both heads that lsvit "
               "trained and evaluated."), ""]
  if to == "hf":
    owner = "model.deit" if cfg["distilled"] else "model.vit"
    lines += ["## Running the layers in another order", "",
              "Reorder (or shorten, to prune) the encoder's layer list, as the LayerShuffle "
              "authors' code does:", "",
              "```python",
              "import torch",
              f"from transformers import {arch}",
              f"model = {arch}.from_pretrained(MODEL_DIR).eval()",
              f"encoder = {owner}  # transformers >= 5 keeps the layers in .layers",
              "layers = encoder.layers if hasattr(encoder, 'layers') else encoder.encoder.layer",
              "order = torch.randperm(len(layers)).tolist()   # or e.g. [0, 4, 8] to prune",
              "reordered = torch.nn.ModuleList([layers[i] for i in order])",
              "if hasattr(encoder, 'layers'):",
              "  encoder.layers = reordered",
              "else:",
              "  encoder.encoder.layer = reordered",
              "with torch.no_grad():",
              "  logits = model(pixel_values=PIXELS).logits",
              "```", ""]
  if extra_keys:
    lines += ["## Parameters a plain ViT does not have", "",
              f"`{EXTRA_FILE}` holds the `{variant}` variant's extra parameters (stacked on the "
              f"layer axis), which this {'transformers' if to == 'hf' else 'timm'} model does not "
              f"use:", ""]
    lines += [f"- `{k}`: {EXTRAS[next(e for e in EXTRAS if k.startswith(e))]}"
              for k in extra_keys]
    lines.append("")
    lines.append(("**This is a partial model**: the `position` variant's layers add a projection "
                  "of a position embedding to their input, which the exported model does not "
                  "compute, so its logits differ from the run's.") if partial else
                 "They do not enter the logits: the exported model computes the run's logits.")
    lines.append("")
  lines += ["Exported with `python -m lsvit.export` "
            "([lsvit](https://github.com/lsvit/lsvit), JAX/Flax)."]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- export

def export(source: str, to: str, out: str, deit_head: Optional[str] = None, partial: bool = False,
           log=print) -> str:
  """Writes the export into the new directory ``out``; returns ``out``."""
  from safetensors.numpy import save_file
  if to not in ("hf", "timm"):
    raise ExportError(f"--to {to!r}: choose hf or timm")
  if deit_head is not None and deit_head not in DEIT_HEADS:
    raise ExportError(f"--deit_head {deit_head!r}: choose one of {', '.join(DEIT_HEADS)}")
  if os.path.exists(out):
    raise ExportError(f"{out} already exists; choose a new --out (nothing is overwritten)")
  params, cfg, facts = read_source(source)
  model = model_lib.build(cfg)  # every field, defaults included (a converted checkpoint's too)
  cfg = {f: getattr(model, f) for f in model_lib.MODEL_FIELDS}
  trained = cfg["deit_head"]
  if deit_head is not None and not cfg["distilled"]:
    raise ExportError("--deit_head applies to distilled (DeiT) models; this model has one head")
  if deit_head == "mean" and trained == "cls":
    raise ExportError("this DeiT was trained with its class-token head alone (deit_head='cls'); "
                      "it has no distillation head to average: use --deit_head cls")
  deit_head = deit_head or trained
  if to == "timm" and cfg["distilled"] and deit_head != "mean":
    raise ExportError("timm's distilled DeiT averages both heads; a class-token-head-only DeiT "
                      "has no timm equivalent: use --to hf")
  extra = extras(params)
  is_partial = cfg["variant"] == "position"
  if is_partial and not partial:
    raise ExportError(
        "variant 'position' adds a projection of a layer-position embedding to every layer, which "
        "a plain ViT does not compute: the exported model's logits would differ from the run's. "
        f"Pass --partial to export it anyway (the extra parameters go to {EXTRA_FILE})")
  labels = _labels(facts, cfg["num_classes"], log)
  os.makedirs(out)
  if to == "hf":
    save_file(hf_state_dict(params, cfg, deit_head), os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    ckpt_lib.write_json(os.path.join(out, "config.json"), hf_config(cfg, labels, deit_head))
    kind = (facts.get("config") or {}).get("data", {}).get("preprocess")
    kind = kind or ("deit" if cfg["distilled"] else "vit")
    ckpt_lib.write_json(os.path.join(out, "preprocessor_config.json"),
                        preprocessor_config(kind, cfg))
  else:
    save_file(timm_state_dict(params, cfg), os.path.join(out, "model.safetensors"))
    ckpt_lib.write_json(os.path.join(out, "config.json"), timm_config(cfg, labels))
    if abs(cfg["ln_eps"] - TIMM_LN_EPS) > 0:
      log(f"note: timm's ViT computes LayerNorm with ε={TIMM_LN_EPS:g}; this model used "
          f"{cfg['ln_eps']:g}, so timm's logits differ from lsvit's in the last digits")
  if extra:
    save_file(extra, os.path.join(out, EXTRA_FILE))
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(model_card(cfg, facts, to, deit_head, is_partial, sorted(extra)))
  what = hf_architecture(cfg, deit_head) if to == "hf" else "timm VisionTransformer"
  log(f"wrote {out}: {what}, {cfg['depth']} layers, {cfg['num_classes']} classes"
      + (f"; {len(extra)} variant-only tensors in {EXTRA_FILE}" if extra else "")
      + ("; PARTIAL: the position projections are not in the exported model" if is_partial
         else ""))
  return out


def push_to_hub(out: str, repo: str, log=print) -> str:
  """Uploads the export directory to the Hugging Face hub repository ``repo``."""
  try:
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=out, repo_id=repo)
  except Exception as e:  # no network, no token, no permission: all end the same way
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ExportError(f"could not push to the hub repository {repo} ({reason}); the export is "
                      f"in {out}: push it later with `huggingface-cli upload {repo} {out}`") \
        from None
  url = f"https://huggingface.co/{repo}"
  log(f"pushed {out} to {url}")
  return url


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True,
                  help="a training workdir (its best checkpoint) or a converted checkpoint")
  ap.add_argument("--to", required=True, choices=["hf", "timm"])
  ap.add_argument("--out", required=True, help="a new directory for the export")
  ap.add_argument("--deit_head", choices=list(DEIT_HEADS),
                  help="DeiT: 'mean' (DeiTForImageClassificationWithTeacher, both heads) or 'cls' "
                       "(DeiTForImageClassification, class token); default: as trained")
  ap.add_argument("--partial", action="store_true",
                  help="export a 'position' model without its position projections")
  ap.add_argument("--push_to_hub", metavar="REPO", help="also upload to this hub repository")
  args = ap.parse_args(argv)
  from lsvit.train_lib import quiet_logs
  quiet_logs()
  try:
    export(args.workdir, args.to, args.out, args.deit_head, args.partial)
    if args.push_to_hub:
      push_to_hub(args.out, args.push_to_hub)
  except (ExportError, ckpt_lib.CheckpointError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  ckpt_lib.exit_process(main())
