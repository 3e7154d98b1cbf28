"""lsvit -> transformers / timm: the exported model computes lsvit's logits (f32, max |diff|
<= 1e-4) in the original order, a random permutation and a pruned order, with the layer list
reordered as the authors' code does; names and shapes checked against the reference layouts."""
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lsvit import convert, data, export
from lsvit import checkpoint as ckpt_lib
from lsvit import model as model_lib
from lsvit import train_lib
from tests import reference
from tests.helpers import tiny_config

TOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Short digits runs (depth 4, width 32): a LayerShuffle ViT, a DeiT, and the two variants
  with parameters a plain ViT lacks."""
  root = tmp_path_factory.mktemp("runs")
  quiet = lambda *a, **k: None
  kinds = {"vit": dict(variant="layershuffle", num_epochs=2, **{"optimizer.lr": 3e-3}),
           "deit": dict(variant="layershuffle", num_epochs=1, **{"model.distilled": True,
                                                                  "optimizer.lr": 3e-3}),
           "predict": dict(variant="predict", num_epochs=1),
           "position": dict(variant="position", num_epochs=1)}
  out = {}
  for name, kw in kinds.items():
    out[name] = str(root / name)
    train_lib.train_and_evaluate(tiny_config(**kw), out[name], log=quiet)
  return out


def images(n=6, seed=0):
  src = data.digits("validation")
  pp = data.Preprocess("plain", 8, 1)
  return np.stack([pp(src[i][0]) for i in range(seed, seed + n)])


def lsvit_logits(workdir, x, order=None, params=None):
  p, _ = ckpt_lib.restore_best(workdir)
  cfg = ckpt_lib.load_model_cfg(workdir)
  m = model_lib.build(cfg)
  out = m.apply({"params": params or p}, jnp.asarray(x), None if order is None else
                jnp.asarray(order, jnp.int32))
  return np.asarray(out["logits"])


def assert_same(got, want):
  assert np.abs(want).max() > 1e-2  # the comparison is not between two near-zero outputs
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


ORDERS = (None, [2, 0, 3, 1], [3, 1])  # original, a permutation, pruned to 2 layers


def test_vit_to_transformers_computes_lsvit_logits(runs, tmp_path):
  from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification
  out = export.export(runs["vit"], "hf", str(tmp_path / "hf"), log=lambda *a: None)
  hf = ViTForImageClassification.from_pretrained(out).eval()
  # every tensor under the names transformers stores on the hub, at their shapes
  want = reference.hub_names(ViTForImageClassification(ViTConfig(**{
      k: v for k, v in json.load(open(os.path.join(out, "config.json"))).items()
      if k not in ("architectures", "model_type")})))
  from safetensors.numpy import load_file
  got = load_file(os.path.join(out, "model.safetensors"))
  assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
  x = images()
  for order in ORDERS:
    assert_same(reference.reference_logits(hf, x, order), lsvit_logits(runs["vit"], x, order))
  assert hf.config.id2label[3] == "3" and hf.config.layer_norm_eps == 1e-6
  # the image processor computes the run's preprocessing
  proc = AutoImageProcessor.from_pretrained(out)
  raw = data.digits("validation")[0][0]  # uint8 [8, 8, 1]
  pixels = proc(raw, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
  np.testing.assert_allclose(np.transpose(pixels, (1, 2, 0)),
                             data.Preprocess("plain", 8, 1)(raw), atol=1e-6)
  # the model card's recipe for shuffling layers in transformers gives lsvit's logits
  card = open(os.path.join(out, "README.md")).read()
  assert "sequential" in card and "arbitrary" in card and "LayerShuffle" in card
  summary = json.load(open(os.path.join(runs["vit"], "summary.json")))
  assert f"{100 * summary['arbitrary']['top1']:.2f} %" in card
  code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
  scope = {"MODEL_DIR": out, "PIXELS": torch.from_numpy(np.transpose(x, (0, 3, 1, 2)))}
  exec(code, scope)
  assert sorted(scope["order"]) == list(range(4))
  assert_same(scope["logits"].numpy(), lsvit_logits(runs["vit"], x, scope["order"]))


@pytest.mark.parametrize("head", ["mean", "cls"])
def test_deit_exports_with_either_head(runs, tmp_path, head):
  import transformers
  out = export.export(runs["deit"], "hf", str(tmp_path / head), deit_head=head,
                      log=lambda *a: None)
  cls = {"mean": "DeiTForImageClassificationWithTeacher", "cls": "DeiTForImageClassification"}
  assert json.load(open(os.path.join(out, "config.json")))["architectures"] == [cls[head]]
  hf = getattr(transformers, cls[head]).from_pretrained(out).eval()
  params, _ = ckpt_lib.restore_best(runs["deit"])
  if head == "cls":  # lsvit's logits with the class-token head alone: (2 W x + 2 b + 0) / 2
    params = dict(params, head={k: 2 * np.asarray(v) for k, v in params["head"].items()},
                  head_dist={k: 0 * np.asarray(v) for k, v in params["head_dist"].items()})
  x = images()
  for order in ORDERS[:2]:
    assert_same(reference.reference_logits(hf, x, order),
                lsvit_logits(runs["deit"], x, order, params))
  card = open(os.path.join(out, "README.md")).read()
  assert ("class-token head's alone" in card) == (head == "cls")


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_timm_layout_reads_back_as_the_same_model(runs, tmp_path, kind):
  from safetensors.numpy import load_file
  out = export.export(runs[kind], "timm", str(tmp_path / "timm"), log=lambda *a: None)
  got = load_file(os.path.join(out, "model.safetensors"))
  # timm's names and shapes, from an independent reference of the same dimensions
  from transformers import (DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig,
                            ViTForImageClassification)
  dims = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
              image_size=8, patch_size=2, num_channels=1, num_labels=10)
  ref = reference.timm_state(DeiTForImageClassificationWithTeacher(DeiTConfig(**dims))
                             if kind == "deit" else ViTForImageClassification(ViTConfig(**dims)))
  assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
  params, cfg = convert.load("timm:" + out)  # heads from the config's model_args
  want, _ = ckpt_lib.restore_best(runs[kind])
  flat_got, flat_want = convert._flatten(params), convert._flatten(want)
  assert sorted(flat_got) == sorted(flat_want)
  for k in flat_want:  # key by key, shape by shape, value by value
    assert flat_got[k].shape == flat_want[k].shape, k
    np.testing.assert_array_equal(flat_got[k], np.asarray(flat_want[k]), err_msg=k)
  assert cfg["num_heads"] == 2 and cfg["distilled"] == (kind == "deit")
  x = images()
  m = model_lib.build(cfg)
  for order in ORDERS:
    o = None if order is None else jnp.asarray(order, jnp.int32)
    assert_same(np.asarray(m.apply({"params": params}, jnp.asarray(x), o)["logits"]),
                lsvit_logits(runs[kind], x, order))


def test_variants_refusals_and_errors(runs, tmp_path, capsys):
  from safetensors.numpy import load_file
  # predict: the position heads do not enter the logits; they go to the extra file
  out = export.export(runs["predict"], "hf", str(tmp_path / "pred"), log=lambda *a: None)
  extra = load_file(os.path.join(out, export.EXTRA_FILE))
  assert sorted({k.rsplit("/", 1)[0] for k in extra}) == [
      "Transformer/encoderblock/PositionHead_Dense", "Transformer/encoderblock/PositionHead_LayerNorm"]
  from transformers import ViTForImageClassification
  hf = ViTForImageClassification.from_pretrained(out).eval()
  x = images()
  assert_same(reference.reference_logits(hf, x, [1, 3, 0, 2]),
              lsvit_logits(runs["predict"], x, [1, 3, 0, 2]))
  assert "do not enter the logits" in open(os.path.join(out, "README.md")).read()
  # position: its layers need the projections; refused unless a partial model is asked for
  with pytest.raises(export.ExportError, match="variant 'position'.*--partial"):
    export.export(runs["position"], "hf", str(tmp_path / "pos"))
  assert not (tmp_path / "pos").exists()
  out = export.export(runs["position"], "hf", str(tmp_path / "pos"), partial=True,
                      log=lambda *a: None)
  assert "This is a partial model" in open(os.path.join(out, "README.md")).read()
  assert "Transformer/layer_pos_embedding" in load_file(os.path.join(out, export.EXTRA_FILE))
  # never overwrite; no best checkpoint; no such directory: one line each, exit 1
  os.makedirs(tmp_path / "nobest" / "best")
  open(tmp_path / "nobest" / "config.json", "w").write("{}")
  for args, want in (
      (["--workdir", runs["vit"], "--to", "hf", "--out", out], "already exists"),
      (["--workdir", str(tmp_path / "nobest"), "--to", "hf", "--out", str(tmp_path / "n")],
       "has no best checkpoint"),
      (["--workdir", str(tmp_path / "nothing"), "--to", "timm", "--out", str(tmp_path / "m")],
       "does not exist")):
    capsys.readouterr()
    assert export.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err


def test_push_without_network_is_one_clear_error(runs, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import huggingface_hub.constants as hub_constants
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
  out = str(tmp_path / "push")
  assert export.main(["--workdir", runs["vit"], "--to", "hf", "--out", out,
                      "--push_to_hub", "someone/lsvit-digits"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "could not push to the hub repository someone/lsvit-digits" in err[0]
  assert f"the export is in {out}" in err[0] and os.path.exists(os.path.join(out, "README.md"))


def test_converted_class_token_deit_exports_as_it_was_trained(tmp_path):
  """A converted checkpoint of transformers' DeiTForImageClassification (one head) exports as
  that class by default, back to the same logits; asking for the two-head mean is refused."""
  from transformers import DeiTConfig, DeiTForImageClassification
  dims = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
              image_size=32, patch_size=8, num_labels=5)
  hf = reference.randomize(DeiTForImageClassification(DeiTConfig(**dims)), seed=7)
  hf.save_pretrained(tmp_path / "src")
  assert convert.main(["--source", f"hf:{tmp_path / 'src'}", "--out", str(tmp_path / "ck")]) == 0
  with pytest.raises(export.ExportError, match="no distillation head to average"):
    export.export(str(tmp_path / "ck"), "hf", str(tmp_path / "mean"), deit_head="mean")
  out = export.export(str(tmp_path / "ck"), "hf", str(tmp_path / "out"), log=lambda *a: None)
  back = DeiTForImageClassification.from_pretrained(out).eval()
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  assert_same(reference.reference_logits(back, x, [2, 0, 1]),
              reference.reference_logits(hf, x, [2, 0, 1]))
  assert "No evaluation is stored" in open(os.path.join(out, "README.md")).read()
