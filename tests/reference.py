"""Reference models from `transformers` (torch CPU), with every weight randomised, and
the same weights written in the layouts each converter reads."""
import os

import numpy as np
import torch


def randomize(model, seed=0):
  """Every parameter random (not HF's zero biases / unit LayerNorms), so each one matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.05
      p.copy_(1.0 + noise if "layernorm" in name and name.endswith("weight") else noise)
  return model.eval()


def hf_model(distilled=False, small=True, eps=1e-12, seed=0, num_labels=7):
  from transformers import (DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig,
                            ViTForImageClassification)
  kw = dict(layer_norm_eps=eps, num_labels=num_labels)
  if small:
    kw.update(hidden_size=48, num_hidden_layers=5, num_attention_heads=3, intermediate_size=96,
              image_size=32, patch_size=8)
  else:
    kw.update(num_labels=1000)  # the defaults are ViT-B/16 at 224
  if distilled:
    return randomize(DeiTForImageClassificationWithTeacher(DeiTConfig(**kw)), seed)
  return randomize(ViTForImageClassification(ViTConfig(**kw)), seed)


def encoder_layers(model):
  return model.deit if hasattr(model, "deit") else model.vit


def reference_logits(model, images_nhwc, order=None):
  """Logits of the HF model with its layer list reordered, as the authors' code shuffles."""
  enc = encoder_layers(model)
  original = enc.layers
  if order is not None:
    enc.layers = torch.nn.ModuleList([original[i] for i in order])
  try:
    with torch.no_grad():
      out = model(pixel_values=torch.from_numpy(np.transpose(images_nhwc, (0, 3, 1, 2))))
  finally:
    enc.layers = original
  return out.logits.numpy()


def hub_names(model):
  """The state dict as stored on the hub (save_pretrained) -- safetensors on disk."""
  import tempfile
  from safetensors.numpy import load_file
  d = tempfile.mkdtemp()
  model.save_pretrained(d)
  return load_file(os.path.join(d, "model.safetensors"))


def timm_state(model):
  """The same weights in timm's VisionTransformer layout (fused qkv)."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  p = "deit." if hasattr(model, "deit") else "vit."
  out = {"cls_token": sd[p + "embeddings.cls_token"], "pos_embed": sd[p + "embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd[p + "embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd[p + "embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd[p + "layernorm.weight"], "norm.bias": sd[p + "layernorm.bias"]}
  if p == "deit.":
    out["dist_token"] = sd[p + "embeddings.distillation_token"]
    out.update({"head.weight": sd["cls_classifier.weight"], "head.bias": sd["cls_classifier.bias"],
                "head_dist.weight": sd["distillation_classifier.weight"],
                "head_dist.bias": sd["distillation_classifier.bias"]})
  else:
    out.update({"head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]})
  for l in range(len(encoder_layers(model).layers)):
    s, t = f"{p}layers.{l}.", f"blocks.{l}."
    a = s + "attention."
    out[t + "attn.qkv.weight"] = np.concatenate([sd[a + f"{n}_proj.weight"] for n in "qkv"])
    out[t + "attn.qkv.bias"] = np.concatenate([sd[a + f"{n}_proj.bias"] for n in "qkv"])
    for src, dst in (("attention.o_proj", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                     ("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
      out[t + dst + ".weight"] = sd[s + src + ".weight"]
      out[t + dst + ".bias"] = sd[s + src + ".bias"]
  return out


def npz_state(model):
  """The same weights in the original JAX ViT .npz layout (big_vision / vit_jax)."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  cfg = model.config
  h, d = cfg.num_attention_heads, cfg.hidden_size
  out = {"cls": sd["vit.embeddings.cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["vit.embeddings.position_embeddings"],
         "embedding/kernel": sd["vit.embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
         "Transformer/encoder_norm/scale": sd["vit.layernorm.weight"],
         "Transformer/encoder_norm/bias": sd["vit.layernorm.bias"],
         "head/kernel": sd["classifier.weight"].T, "head/bias": sd["classifier.bias"]}
  for l in range(cfg.num_hidden_layers):
    s, t = f"vit.layers.{l}.", f"Transformer/encoderblock_{l}/"
    m = t + "MultiHeadDotProductAttention_1/"
    for src, dst in (("q", "query"), ("k", "key"), ("v", "value")):
      out[m + dst + "/kernel"] = sd[s + f"attention.{src}_proj.weight"].T.reshape(d, h, d // h)
      out[m + dst + "/bias"] = sd[s + f"attention.{src}_proj.bias"].reshape(h, d // h)
    out[m + "out/kernel"] = sd[s + "attention.o_proj.weight"].T.reshape(h, d // h, d)
    out[m + "out/bias"] = sd[s + "attention.o_proj.bias"]
    out[t + "LayerNorm_0/scale"], out[t + "LayerNorm_0/bias"] = sd[s + "layernorm_before.weight"], sd[s + "layernorm_before.bias"]
    out[t + "LayerNorm_2/scale"], out[t + "LayerNorm_2/bias"] = sd[s + "layernorm_after.weight"], sd[s + "layernorm_after.bias"]
    out[t + "MlpBlock_3/Dense_0/kernel"], out[t + "MlpBlock_3/Dense_0/bias"] = sd[s + "mlp.fc1.weight"].T, sd[s + "mlp.fc1.bias"]
    out[t + "MlpBlock_3/Dense_1/kernel"], out[t + "MlpBlock_3/Dense_1/bias"] = sd[s + "mlp.fc2.weight"].T, sd[s + "mlp.fc2.bias"]
  return out


def variant_forward(model, images_nhwc, order, variant, extras, eps):
  """A `transformers` ViT run as LayerShuffle-position or -predict, written from the paper
  (Sec. 3.2, 3.3) and the authors' architecture, independently of lsvit:
  position: before the layer at position p, z <- z + GELU(Linear(LN(concat(z, e_p)))), with one
    shared table e of F=32 rows indexed by position, and the LN and Linear of the layer;
  predict: after each layer, Linear(LN(mean of the tokens)) predicts the position it ran at.
  ``extras`` holds numpy arrays stacked on the layer axis. Returns (logits, position logits)."""
  import torch.nn.functional as F
  t = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in extras.items()}
  vit = model.vit
  x = vit.embeddings(torch.from_numpy(np.transpose(images_nhwc, (0, 3, 1, 2))))
  pos_logits = []
  with torch.no_grad():
    for p, l in enumerate(order):
      if variant == "position":
        e = t["table"][p].expand(x.shape[0], x.shape[1], -1)
        z = torch.cat([x, e], -1)
        h = F.layer_norm(z, (z.shape[-1],), t["proj_ln_w"][l], t["proj_ln_b"][l], eps)
        x = x + F.gelu(F.linear(h, t["proj_w"][l], t["proj_b"][l]))
      x = vit.layers[l](x)
      if variant == "predict":
        u = F.layer_norm(x.mean(1), (x.shape[-1],), t["head_ln_w"][l], t["head_ln_b"][l], eps)
        pos_logits.append(F.linear(u, t["head_w"][l], t["head_b"][l]))
    x = vit.layernorm(x)
    logits = model.classifier(x[:, 0]).numpy()
  return logits, (torch.stack(pos_logits).numpy() if pos_logits else None)
