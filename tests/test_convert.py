"""Converted weights give the reference implementation's logits (max |diff| <= 1e-4, f32),
in the original order, a random permutation and a pruned order."""

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from lsvit import checkpoint, convert
from lsvit import model as model_lib
from tests import reference

TOL = 1e-4


def ours(source, num_heads=None):
  params, cfg = convert.load(source, num_heads)
  model = model_lib.build(cfg)
  fn = jax.jit(lambda p, x, o: model.apply({"params": p}, x, o)["logits"])
  return lambda x, order: np.asarray(fn(params, x, np.asarray(order, np.int32))), cfg


def images(size, n=2, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def check_orders(ref, fn, x, depth, seed=0):
  rng = np.random.default_rng(seed)
  perm = rng.permutation(depth)
  pruned = np.sort(rng.choice(depth, max(1, depth // 2), replace=False))
  for order in (np.arange(depth), perm, pruned, rng.permutation(pruned)):
    want = reference.reference_logits(ref, x, order.tolist())
    got = fn(x, order)
    err = np.abs(got - want).max()
    assert err <= TOL, f"order {order.tolist()}: max |diff| {err:.2e} > {TOL}"
    assert np.abs(want).max() > 1e-2  # the comparison is not between two near-zero outputs


def write_hub(model, directory):
  model.save_pretrained(directory)
  return directory


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
def test_hf_small_hub_names(tmp_path, distilled):
  ref = reference.hf_model(distilled=distilled)
  fn, cfg = ours("hf:" + write_hub(ref, str(tmp_path)))
  assert cfg["distilled"] == distilled and cfg["depth"] == 5 and cfg["num_heads"] == 3
  assert cfg["ln_eps"] == 1e-12
  check_orders(ref, fn, images(32), 5)


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
def test_hf_inmemory_v5_names_from_bin(tmp_path, distilled):
  """transformers >= 5 state_dict() names, in a PyTorch .bin read with weights_only."""
  ref = reference.hf_model(distilled=distilled, seed=3)
  assert any(".layers.0.attention.q_proj" in k for k in ref.state_dict())
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  ref.config.to_json_file(tmp_path / "config.json")
  fn, _ = ours(f"hf:{tmp_path}")
  check_orders(ref, fn, images(32, seed=1), 5, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("distilled", [False, True], ids=["vit_b16", "deit_b16"])
def test_hf_full_b16_224(tmp_path, distilled):
  ref = reference.hf_model(distilled=distilled, small=False)
  fn, cfg = ours("hf:" + write_hub(ref, str(tmp_path)))
  assert (cfg["width"], cfg["depth"], cfg["patch_size"], cfg["image_size"]) == (768, 12, 16, 224)
  check_orders(ref, fn, images(224), 12)


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
def test_timm_layout(tmp_path, distilled):
  ref = reference.hf_model(distilled=distilled, eps=1e-6, seed=5)  # timm's LayerNorm eps
  path = tmp_path / "model.safetensors"
  save_file(reference.timm_state(ref), str(path))
  fn, cfg = ours(f"timm:{path}", num_heads=3)  # timm files do not store it
  assert cfg["ln_eps"] == 1e-6
  check_orders(ref, fn, images(32, seed=2), 5, seed=2)


def test_npz_layout(tmp_path):
  ref = reference.hf_model(eps=1e-6, seed=7)
  path = tmp_path / "ViT-tiny.npz"
  np.savez(path, **reference.npz_state(ref))
  fn, cfg = ours(f"npz:{path}")
  check_orders(ref, fn, images(32, seed=3), 5, seed=3)


def _hub_sd(seed=0):
  return reference.hub_names(reference.hf_model(seed=seed))


def test_conversion_errors_list_missing_unexpected_and_shapes(tmp_path):
  sd = _hub_sd()
  del sd["vit.encoder.layer.2.layernorm_after.bias"]
  sd["vit.encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
  sd["vit.encoder.layer.1.intermediate.dense.weight"] = np.zeros((97, 48), np.float32)
  save_file(sd, str(tmp_path / "model.safetensors"))
  with pytest.raises(convert.ConversionError) as e:
    convert.load(f"hf:{tmp_path}", num_heads=3)
  msg = str(e.value)
  assert "missing keys (1): ['Transformer/encoderblock_2/LayerNorm_2/bias']" in msg
  assert "unexpected keys (1): ['encoder.layer.0.extra.weight']" in msg
  assert "wrong shapes (1): Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel: " \
         "checkpoint (48, 97) vs model (48, 96)" in msg


def test_convert_cli_writes_orbax_and_training_can_restore(tmp_path, capsys):
  ref = reference.hf_model()
  src = write_hub(ref, str(tmp_path / "hf"))
  out = str(tmp_path / "ckpt")
  assert convert.main(["--source", f"hf:{src}", "--out", out]) == 0
  params, cfg = checkpoint.load_params(out)
  model = model_lib.build(cfg)
  x = images(32)
  got = np.asarray(model.apply({"params": params}, x)["logits"])
  assert np.abs(got - reference.reference_logits(ref, x)).max() <= TOL
  # never overwrites
  assert convert.main(["--source", f"hf:{src}", "--out", out]) == 2
  assert "refusing to overwrite" in capsys.readouterr().err


def test_convert_cli_new_head_and_image_size(tmp_path):
  ref = reference.hf_model()
  src = write_hub(ref, str(tmp_path / "hf"))
  out = str(tmp_path / "c100")
  assert convert.main(["--source", f"hf:{src}", "--out", out, "--num_classes", "100",
                       "--image_size", "48"]) == 0
  params, cfg = checkpoint.load_params(out)
  assert cfg["num_classes"] == 100 and cfg["image_size"] == 48
  assert params["head"]["kernel"].shape == (48, 100)
  assert params["pos_embedding"].shape == (1, 1 + 6 * 6, 48)
  # the class token's position embedding is kept, the grid is resized (bicubic)
  orig, _ = convert.load(f"hf:{src}")
  np.testing.assert_array_equal(params["pos_embedding"][:, 0], orig["pos_embedding"][:, 0])
  np.testing.assert_array_equal(params["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"],
                                orig["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"])


def test_hub_id_offline_fails_clearly(monkeypatch, capsys, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  rc = convert.main(["--source", "hf:google/vit-base-patch16-224", "--out", str(tmp_path / "x")])
  err = capsys.readouterr().err
  assert rc == 2
  assert "could not fetch 'google/vit-base-patch16-224'" in err and "local directory" in err
  assert "Traceback" not in err


def test_bad_source_prefix():
  with pytest.raises(convert.ConversionError, match="must start with hf:, timm: or npz:"):
    convert.load("google/vit-base-patch16-224")


def test_adapt_keeps_first_k_layers_and_adds_variant_params():
  ref = reference.hf_model()
  params, cfg = convert.load("hf:" + write_hub(ref, __import__("tempfile").mkdtemp()))
  m = model_lib.build({**cfg, "depth": 3, "variant": "position"})
  new = convert.adapt(params, model_lib.init_params(m), m, keep_layers=3)
  stack = params["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"]
  np.testing.assert_array_equal(new["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"],
                                stack[:3])
  assert new["Transformer"]["layer_pos_embedding"].shape == (3, 32)
  with pytest.raises(ValueError, match="keep_layers=9"):
    convert.adapt(params, model_lib.init_params(m), m, keep_layers=9)
