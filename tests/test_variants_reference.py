"""LayerShuffle-position and -predict against an independent PyTorch reference
(tests/reference.variant_forward: a transformers ViT plus the paper's extra modules), same
weights, a random order: logits and position logits equal within 1e-4 (f32)."""
import jax.numpy as jnp
import numpy as np
import pytest

from lsvit import convert
from lsvit import model as model_lib
from tests import reference

F_DIM = 32


@pytest.mark.parametrize("variant", ["position", "predict"])
def test_variant_matches_pytorch_reference(tmp_path, variant):
  hf = reference.hf_model(small=True, seed=3)
  hf.save_pretrained(tmp_path)
  plain, cfg = convert.load(f"hf:{tmp_path}")
  d, depth, eps = cfg["width"], cfg["depth"], cfg["ln_eps"]
  rng = np.random.default_rng(0)
  r = lambda *shape, scale=0.05: (rng.normal(size=shape) * scale).astype(np.float32)
  # torch layouts (Linear weight [out, in]); lsvit's are their transposes
  ex = {"table": r(depth, F_DIM, scale=1.0),
        "proj_ln_w": 1 + r(depth, d + F_DIM), "proj_ln_b": r(depth, d + F_DIM),
        "proj_w": r(depth, d, d + F_DIM), "proj_b": r(depth, d),
        "head_ln_w": 1 + r(depth, d), "head_ln_b": r(depth, d),
        "head_w": r(depth, depth, d, scale=1.0), "head_b": r(depth, depth)}
  model = model_lib.build(dict(cfg, variant=variant, pos_table="shared"))
  params = model_lib.init_params(model)
  params = {**params, **{k: v for k, v in plain.items() if k != "Transformer"}}
  blocks = dict(params["Transformer"]["encoderblock"])
  blocks.update(plain["Transformer"]["encoderblock"])
  enc = {"encoderblock": blocks, "encoder_norm": plain["Transformer"]["encoder_norm"]} \
      if "encoder_norm" in plain["Transformer"] else {"encoderblock": blocks}
  params["Transformer"] = {**params["Transformer"], **enc}
  if variant == "position":
    params["Transformer"]["layer_pos_embedding"] = ex["table"]
    blocks["PositionProj_LayerNorm"] = {"scale": ex["proj_ln_w"], "bias": ex["proj_ln_b"]}
    blocks["PositionProj_Dense"] = {"kernel": ex["proj_w"].transpose(0, 2, 1),
                                    "bias": ex["proj_b"]}
  else:
    blocks["PositionHead_LayerNorm"] = {"scale": ex["head_ln_w"], "bias": ex["head_ln_b"]}
    blocks["PositionHead_Dense"] = {"kernel": ex["head_w"].transpose(0, 2, 1),
                                    "bias": ex["head_b"]}
  x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  order = [3, 0, 4, 1, 2]
  out = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(order, jnp.int32))
  want, want_pos = reference.variant_forward(hf, x, order, variant, ex, eps)
  assert np.abs(want).max() > 1e-2  # not two near-zero outputs
  np.testing.assert_allclose(np.asarray(out["logits"]), want, atol=1e-4, rtol=0)
  if variant == "predict":
    assert np.abs(want_pos).max() > 1e-1
    np.testing.assert_allclose(np.asarray(out["pos_logits"]), want_pos, atol=1e-4, rtol=0)
  # and the extras matter: without them the logits differ from the reference
  if variant == "position":
    plain_model = model_lib.build(dict(cfg, variant="baseline"))
    base = plain_model.apply({"params": plain}, jnp.asarray(x), jnp.asarray(order, jnp.int32))
    assert np.abs(np.asarray(base["logits"]) - want).max() > 1e-3
