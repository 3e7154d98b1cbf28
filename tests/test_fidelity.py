"""Fidelity to the authors' code: LayerShuffle-position and -predict against an independent
PyTorch reference (tests/reference.variant_forward: a transformers ViT plus the paper's extra
modules), the DeiT class-token head against DeiTForImageClassification, and best-checkpoint
selection in shuffled order; logits within 1e-4 (f32)."""
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


def test_deit_class_token_head_matches_deit_for_image_classification(tmp_path):
  """deit_head='cls': the class-token head alone, as transformers' DeiTForImageClassification
  (the authors' model); converting a two-head distilled checkpoint starts that head fresh."""
  from transformers import DeiTConfig, DeiTForImageClassification
  dims = dict(hidden_size=48, num_hidden_layers=5, num_attention_heads=3, intermediate_size=96,
              image_size=32, patch_size=8, num_labels=7, layer_norm_eps=1e-12)
  hf = reference.randomize(DeiTForImageClassification(DeiTConfig(**dims)), seed=4)
  hf.save_pretrained(tmp_path / "cls")
  params, cfg = convert.load(f"hf:{tmp_path / 'cls'}")
  assert cfg["distilled"] and "head_dist" not in params
  model = model_lib.build(dict(cfg, deit_head="cls"))
  x = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  for order in (None, [4, 1, 3, 0, 2], [2, 0]):
    o = None if order is None else jnp.asarray(order, jnp.int32)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(x), o)["logits"])
    want = reference.reference_logits(hf, x, order)
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # from a distilled two-head checkpoint: the class-token head starts from its initialisation
  teacher = reference.hf_model(distilled=True, small=True)
  teacher.save_pretrained(tmp_path / "teacher")
  both, tcfg = convert.load(f"hf:{tmp_path / 'teacher'}")
  m = model_lib.build(dict(tcfg, deit_head="cls"))
  init = model_lib.init_params(m)
  adapted = convert.adapt(both, init, m)
  assert "head_dist" not in adapted and not np.asarray(adapted["head"]["kernel"]).any()
  np.testing.assert_array_equal(adapted["cls"], both["cls"])  # the rest is pretrained
  kept = convert.adapt(both, model_lib.init_params(model_lib.build(tcfg)), model_lib.build(tcfg))
  np.testing.assert_array_equal(kept["head"]["kernel"], both["head"]["kernel"])


@pytest.mark.parametrize("variant, epochs", [("layershuffle", 3), ("predict", 2)])
def test_best_checkpoint_is_chosen_on_the_configured_order(tmp_path, variant, epochs):
  """best_by='auto' picks, for shuffled variants, the epoch with the lowest validation loss
  in arbitrary order (for predict: plus the weighted position loss), as the authors' Trainer."""
  import json
  from lsvit import checkpoint, train_lib
  from tests.helpers import tiny_config
  config = tiny_config(variant=variant, num_epochs=epochs, **{"optimizer.lr": 3e-3})
  assert train_lib.selection_order(config) == "arbitrary"
  train_lib.train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert all("val_arbitrary/loss" in r for r in rows)
  select = [r["val_arbitrary/loss"] + config.predict_loss_weight * r.get(
      "val_arbitrary/position_loss", 0.0) for r in rows]
  _, meta = checkpoint.restore_best(str(tmp_path))
  assert meta["epoch"] == rows[int(np.argmin(select))]["epoch"]
  assert meta["select_loss"] == pytest.approx(min(select), rel=1e-9)
  if variant == "predict":
    assert all(r["val_arbitrary/position_loss"] > 0 for r in rows)
  config.best_by = "sequential"
  assert train_lib.selection_order(config) == "sequential"


def test_position_and_predict_initialisation_follow_the_config():
  base = dict(width=32, depth=4, mlp_dim=64, num_heads=2, patch_size=2, image_size=8, channels=1,
              num_classes=10)
  p = model_lib.init_params(model_lib.build(dict(base, variant="position",
                                                 pos_table_init="zeros")))
  assert not np.asarray(p["Transformer"]["layer_pos_embedding"]).any()
  p = model_lib.init_params(model_lib.build(dict(base, variant="position",
                                                 pos_table_init="normal")))
  assert 0.01 < float(np.asarray(p["Transformer"]["layer_pos_embedding"]).std()) < 0.03
  k = model_lib.init_params(model_lib.build(dict(base, variant="predict",
                                                 predict_head_init="normal")))
  w = np.asarray(k["Transformer"]["encoderblock"]["PositionHead_Dense"]["kernel"])
  assert 0.01 < float(w.std()) < 0.03
  with pytest.raises(ValueError, match="unknown pos_table_init 'ones'"):
    model_lib.init_params(model_lib.build(dict(base, variant="position", pos_table_init="ones")))


@pytest.mark.parametrize("kind", ["vit_center", "deit_center"])
def test_authors_preprocessing_equals_transformers_processor(kind):
  """The authors' preprocessing (shorter side to the size, centre crop, the model's mean/std),
  as lsvit computes it and as the exported preprocessor_config.json makes transformers compute
  it, on images of several shapes."""
  from transformers import DeiTImageProcessor
  from lsvit import data, export
  cfg = {"image_size": 32, "channels": 3}
  spec = {k: v for k, v in export.preprocessor_config(kind, cfg).items()
          if k != "image_processor_type"}
  proc = DeiTImageProcessor(**spec)
  rng = np.random.default_rng(0)
  for shape in [(40, 64, 3), (64, 41, 3), (32, 32, 3), (300, 500, 3)]:
    img = (rng.random(shape) * 255).astype(np.uint8)
    want = np.transpose(proc(img, return_tensors="np")["pixel_values"][0], (1, 2, 0))
    np.testing.assert_allclose(data.Preprocess(kind, 32)(img), want, atol=1e-6)
