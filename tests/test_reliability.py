"""No silent wrong answer: sealed checkpoints, settings the converter does not implement,
workdir identity, orders under jit, and one clear line for every bad input."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsvit import checkpoint as ckpt_lib
from lsvit import convert
from lsvit import model as model_lib
from lsvit import cli
from lsvit import train_lib
from tests import reference
from tests.helpers import ROOT
from tests.helpers import max_diff, tiny_config

SPE = 44  # steps per epoch of tiny_config (1,438 training digits, batch 32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 2-epoch run (latest steps 44 and 88, sealed) to copy and damage."""
  wd = str(tmp_path_factory.mktemp("trained") / "run")
  train_lib.train_and_evaluate(tiny_config(), wd, log=lambda *a: None)
  return wd


def copy_run(src, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def flip_bit(path, rng):
  data = bytearray(open(path, "rb").read())
  i = int(rng.integers(len(data)))
  data[i] ^= 1 << int(rng.integers(8))
  open(path, "wb").write(bytes(data))


def step_files(step_dir):
  return sorted(os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns)


# ----------------------------------------------------------------------------- sealed checkpoints

def test_every_bit_flip_in_every_stored_file_is_found(trained, tmp_path):
  wd = copy_run(trained, tmp_path)
  rng = np.random.default_rng(0)
  dirs = [os.path.join(wd, "checkpoints", "88"), os.path.join(wd, "best", str(
      max(int(s) for s in os.listdir(os.path.join(wd, "best")))))]
  checked = 0
  for d in dirs:
    assert ckpt_lib.seal_problem(d) is None
    files = step_files(d)
    assert ckpt_lib.SEAL in {os.path.basename(f) for f in files} and len(files) > 15
    for f in files:  # array data, Orbax metadata, JSON meta and the seal itself
      original = open(f, "rb").read()
      for _ in range(2):
        flip_bit(f, rng)
        assert ckpt_lib.seal_problem(d) is not None, f
        open(f, "wb").write(original)
        checked += 1
    assert ckpt_lib.seal_problem(d) is None
  assert checked > 30
  # a removed, an added and a truncated file are found too
  victim = next(f for f in step_files(dirs[0]) if "/d/" in f)
  open(victim, "r+b").truncate(10)
  assert "changed size" in ckpt_lib.seal_problem(dirs[0])
  os.remove(victim)
  assert "is missing" in ckpt_lib.seal_problem(dirs[0])
  open(os.path.join(dirs[1], "extra"), "w").write("x")
  assert "was added" in ckpt_lib.seal_problem(dirs[1])


def test_damaged_best_is_refused_by_evaluate_and_train(trained, tmp_path, capsys):
  wd = copy_run(trained, tmp_path)
  best = os.path.join(wd, "best", str(max(int(s) for s in os.listdir(os.path.join(wd, "best")))))
  data = max(step_files(os.path.join(best, "params")), key=os.path.getsize)
  flip_bit(data, np.random.default_rng(1))
  with pytest.raises(ckpt_lib.CheckpointError, match="refusing to use .*checksum mismatch"):
    ckpt_lib.restore_best(wd)
  capsys.readouterr()
  assert cli.evaluate(["--mode", "sequential", "--workdir", wd, "--no_progress"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: refusing to use") and best in err[0], err
  summary = open(os.path.join(wd, "summary.json")).read()
  # re-running train.py must not rewrite summary.json from the damaged parameters
  assert cli.train(tiny_config(), wd) == 1
  assert "refusing to use" in capsys.readouterr().err
  assert open(os.path.join(wd, "summary.json")).read() == summary


def test_damaged_latest_falls_back_to_previous_step_and_ends_as_uninterrupted(trained, tmp_path):
  wd = copy_run(trained, tmp_path)
  flip_bit(max(step_files(os.path.join(wd, "checkpoints", "88", "state")), key=os.path.getsize),
           np.random.default_rng(2))
  logs = []
  summary = train_lib.train_and_evaluate(tiny_config(), wd, log=logs.append)
  said = "\n".join(logs)
  assert "checkpoints/88: its stored bytes changed" in said and "resuming from step 44" in said
  assert os.listdir(os.path.join(wd, "set_aside"))  # moved aside, not deleted
  assert max_diff(ckpt_lib.restore_best(trained)[0], ckpt_lib.restore_best(wd)[0]) == 0.0
  assert summary["sequential"] == json.load(open(os.path.join(trained, "summary.json")))["sequential"]


def test_unsealed_latest_from_an_interrupted_save_is_set_aside(trained, tmp_path):
  wd = copy_run(trained, tmp_path)
  os.remove(os.path.join(wd, "checkpoints", "88", ckpt_lib.SEAL))
  ck = ckpt_lib.RunCheckpoints(wd, 2, log=lambda *a: None)
  try:
    assert ck.resume_point() == 44
    assert ck.latest.all_steps() == [44]
  finally:
    ck.close()


def test_truncated_orbax_file_of_unsealed_run_prints_one_line(trained, tmp_path):
  """A run written before seals existed: Orbax's own failure, without its pages of noise."""
  wd = copy_run(trained, tmp_path)
  model_json = os.path.join(wd, "model.json")
  m = json.load(open(model_json))
  del m[ckpt_lib.SEALED_KEY]
  json.dump(m, open(model_json, "w"))
  for best in os.listdir(os.path.join(wd, "best")):
    data = max(step_files(os.path.join(wd, "best", best, "params")), key=os.path.getsize)
    open(data, "r+b").truncate(100)
  r = subprocess.run([sys.executable, "evaluate.py", "--mode", "sequential", "--workdir", wd,
                      "--no_progress"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "PYTHONPATH": ROOT})
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert len(lines) == 2, lines  # the warning that it cannot be verified, then the error
  assert "cannot be verified" in lines[0] and lines[1].startswith("error: could not restore")


# ----------------------------------------------------------------------------- the workdir is one run

def test_workdir_with_only_best_of_another_run_is_refused(trained, tmp_path):
  wd = copy_run(trained, tmp_path)
  for name in ("config.json", "checkpoints", "summary.json", "metrics.jsonl"):
    path = os.path.join(wd, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  with pytest.raises(ckpt_lib.CheckpointError, match="holds a run's files .*best.* no config.json"):
    train_lib.train_and_evaluate(tiny_config(**{"optimizer.lr": 5e-4}), wd)
  assert not os.path.exists(os.path.join(wd, "config.json"))
  wd2 = copy_run(trained, tmp_path, "run2")  # config.json present, checkpoints/ gone
  shutil.rmtree(os.path.join(wd2, "checkpoints"))
  with pytest.raises(ckpt_lib.CheckpointError, match="optimizer.lr: 0.001 -> 0.0005"):
    train_lib.train_and_evaluate(tiny_config(**{"optimizer.lr": 5e-4}), wd2)


# ----------------------------------------------------------------------------- metrics of a resumed epoch

def test_mid_epoch_resume_logs_the_whole_epoch_and_tolerates_a_torn_metrics_line(tmp_path,
                                                                                 monkeypatch):
  config = tiny_config(num_epochs=2, checkpoint_every_steps=20, **{"model.dropout": 0.1})
  full = str(tmp_path / "full")
  train_lib.train_and_evaluate(config, full, log=lambda *a: None)

  class Stop(Exception):
    pass

  original = ckpt_lib.RunCheckpoints.save_latest

  def save_then_stop(self, step, state, meta):
    original(self, step, state, meta)
    if step == 60:  # mid-epoch 2 (steps 45-88), right after its mid-epoch save
      raise Stop

  wd = str(tmp_path / "resumed")
  monkeypatch.setattr(ckpt_lib.RunCheckpoints, "save_latest", save_then_stop)
  with pytest.raises(Stop):
    train_lib.train_and_evaluate(config, wd, log=lambda *a: None)
  monkeypatch.setattr(ckpt_lib.RunCheckpoints, "save_latest", original)
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 88, "train/lo')  # what a crash while writing leaves
  logs = []
  train_lib.train_and_evaluate(config, wd, log=logs.append)
  assert any("dropped its unfinished last line" in l for l in logs)
  assert any(f"resuming from {wd}/checkpoints/60" in l for l in logs)
  a = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
  b = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["epoch"] for r in b] == [1, 2]
  for k in ("train/loss", "train/accuracy", "train/ce"):
    assert abs(a[1][k] - b[1][k]) < 1e-6, (k, a[1][k], b[1][k])


def test_nan_before_any_checkpoint_says_so(tmp_path, monkeypatch):
  orig = train_lib.make_train_step

  def poisoned(model, tx, cfg):
    step = orig(model, tx, cfg)

    def wrapped(state, batch):
      new, m = step(state, batch)
      m["loss"] = jnp.nan * m["loss"]
      m["nonfinite"] = jnp.ones((), jnp.int32)
      return new, m
    return wrapped

  monkeypatch.setattr(train_lib, "make_train_step", poisoned)
  with pytest.raises(train_lib.TrainingDiverged, match="no checkpoint had been saved yet"):
    train_lib.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path), log=lambda *a: None)


# ----------------------------------------------------------------------------- orders and images

def test_invalid_traced_orders_cannot_pass_for_a_result(digits_batch):
  model = model_lib.build(train_lib.model_config(tiny_config(), 10))
  params = model_lib.init_params(model, 0)
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)
  x = digits_batch[0][:8]
  fn = jax.jit(lambda p, o: model.apply({"params": p}, x, o)["logits"])
  good = np.asarray(fn(params, jnp.asarray([3, 1, 0, 2], jnp.int32)))
  assert np.isfinite(good).all() and np.abs(good).max() > 1e-3
  np.testing.assert_allclose(good, model.apply({"params": params}, x, [3, 1, 0, 2])["logits"],
                             atol=1e-5)
  for bad in ([0, 0, 1, 2], [-1, 0, 1, 2], [4, 0, 1, 2], [0, 1, 1], [7]):
    out = np.asarray(fn(params, jnp.asarray(bad, jnp.int32)))
    assert np.isnan(out).all(), bad  # without the check: clamped/repeated layers, plausible logits
  assert np.isfinite(np.asarray(fn(params, jnp.asarray([2, 0], jnp.int32)))).all()  # pruned


def test_integer_images_are_refused(digits_batch):
  model = model_lib.build(train_lib.model_config(tiny_config(), 10))
  params = model_lib.init_params(model, 0)
  raw = np.zeros((2, 8, 8, 1), np.uint8)
  with pytest.raises(ValueError, match="dtype uint8.*Preprocess"):
    model.apply({"params": params}, raw)


# ----------------------------------------------------------------------------- the converter

def _save_hf(tmp_path, name, **cfg_changes):
  ref = reference.hf_model(seed=3)
  for k, v in cfg_changes.items():
    setattr(ref.config, k, v)
  ref.save_pretrained(tmp_path / name)
  return ref, f"hf:{tmp_path / name}"


def test_converter_refuses_settings_it_does_not_implement(tmp_path):
  _, src = _save_hf(tmp_path, "tanh", hidden_act="gelu_pytorch_tanh")
  with pytest.raises(convert.ConversionError, match="hidden_act='gelu_pytorch_tanh'"):
    convert.load(src)
  _, src = _save_hf(tmp_path, "unknown", rope_theta=10000.0)
  with pytest.raises(convert.ConversionError, match="rope_theta=10000.0"):
    convert.load(src)
  _, src = _save_hf(tmp_path, "other")
  path = tmp_path / "other" / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "dinov2"}))
  with pytest.raises(convert.ConversionError, match="model_type='dinov2'"):
    convert.load(src)


def test_converter_honours_qkv_bias_false(tmp_path):
  from transformers import ViTConfig, ViTForImageClassification
  ref = reference.randomize(ViTForImageClassification(ViTConfig(
      hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
      image_size=32, patch_size=8, num_labels=7, qkv_bias=False)), seed=4)
  ref.save_pretrained(tmp_path / "nobias")
  params, cfg = convert.load(f"hf:{tmp_path / 'nobias'}")
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(model_lib.build(cfg).apply({"params": params}, x, [2, 0, 1])["logits"])
  want = reference.reference_logits(ref, x, [2, 0, 1])
  assert np.abs(want).max() > 1e-2
  np.testing.assert_allclose(ours, want, atol=1e-4)


def test_timm_config_of_another_architecture_is_refused(tmp_path):
  from safetensors.numpy import save_file
  ref = reference.hf_model(eps=1e-6, seed=5)
  d = tmp_path / "timm"
  d.mkdir()
  save_file(reference.timm_state(ref), str(d / "model.safetensors"))
  for cfg, bad in (({"architecture": "vit_base_patch16_clip_224.openai"}, "clip"),
                   ({"architecture": "vit_base_patch16_224", "global_pool": "avg"},
                    "global_pool='avg'")):
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(convert.ConversionError, match=bad):
      convert.load(f"timm:{d}", num_heads=3)
  (d / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224.augreg_in1k",
                                             "global_pool": "token"}))
  convert.load(f"timm:{d}", num_heads=3)


def test_converter_file_errors(tmp_path, capsys):
  cases = []
  cases.append((["--source", "hf:./no/such/dir"], "no such file or directory: ./no/such/dir"))
  ref = reference.hf_model(seed=6)
  ref.save_pretrained(tmp_path / "trunc")
  st = tmp_path / "trunc" / "model.safetensors"
  st.write_bytes(st.read_bytes()[:5000])
  cases.append((["--source", f"hf:{tmp_path / 'trunc'}"], "cannot read"))
  import torch
  (tmp_path / "pickled").mkdir()
  torch.save({"w": torch.zeros(2), "obj": Exception("code")}, tmp_path / "pickled" / "pytorch_model.bin")
  cases.append((["--source", f"hf:{tmp_path / 'pickled'}"], "holds Python objects"))
  capsys.readouterr()  # transformers' own progress output while saving the fixtures
  for i, (args, want) in enumerate(cases):
    assert convert.main(args + ["--out", str(tmp_path / f"out{i}")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    assert "weights_only=False" not in err[0]


# ----------------------------------------------------------------------------- one line per bad input

def _image_folder(root, classes, per_class=4, size=8):
  from PIL import Image
  for split in ("train", "val"):
    for c, n in classes.items():
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for i in range(n if split == "train" else 1):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(
            os.path.join(root, split, c, f"{i}.png"))


def _one_error_line(capsys, want):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and want in err[0], err


def test_train_bad_inputs_give_one_line(tmp_path, capsys):
  def folder_config(root, **kw):
    return tiny_config(**{"data.name": "folder", "data.dir": str(root), "data.train_split": "train",
                          "data.eval_split": "val", "model.channels": 3, "batch_size": 4,
                          "eval_batch_size": 4, "num_epochs": 1, **kw})

  cases = [(tiny_config(batch_size=0), "batch_size=0"), (tiny_config(num_epochs=-1), "num_epochs=-1"),
           (tiny_config(keep_checkpoints=1), "keep_checkpoints=1")]
  _image_folder(tmp_path / "ok", {"a": 4, "b": 4, "c": 4})
  cases.append((folder_config(tmp_path / "ok", **{"model.num_classes": 10}),
                "model.num_classes=10 but the folder training data has 3 classes"))
  _image_folder(tmp_path / "empty", {"a": 4, "b": 0})
  cases.append((folder_config(tmp_path / "empty", **{"model.num_classes": 0}),
                f"class folder {tmp_path / 'empty' / 'train' / 'b'} has no images"))
  _image_folder(tmp_path / "trunc", {"a": 4, "b": 4})
  bad = tmp_path / "trunc" / "train" / "b" / "2.png"
  bad.write_bytes(bad.read_bytes()[:30])
  cases.append((folder_config(tmp_path / "trunc", **{"model.num_classes": 0}),
                f"cannot read image {bad}"))
  for i, (config, want) in enumerate(cases):
    assert cli.train(config, str(tmp_path / f"wd{i}")) == 1, want
    _one_error_line(capsys, want)
  assert cli.train(tiny_config(), "/proc/lsvit_readonly/wd") == 1
  _one_error_line(capsys, "cannot write to workdir /proc/lsvit_readonly/wd")


def test_evaluate_bad_inputs_give_one_line(trained, tmp_path, capsys):
  (tmp_path / "a_file").write_text("x")
  for args, want in ((["--orders", "0"], "--orders: 0 must be at least 1"),
                     (["--merges", "-3"], "--merges: -3 must be at least 1"),
                     (["--merge_base", "first"], "--merge_base: 'first'")):
    with pytest.raises(SystemExit) as e:
      cli.evaluate(["--mode", "merge", "--workdir", trained] + args)
    assert e.value.code == 2
    assert want in capsys.readouterr().err
  for args, want in ((["--out", str(tmp_path / "a_file")], "is an existing file"),
                     (["--out", "/proc/lsvit_readonly/eval"], "cannot write results to")):
    assert cli.evaluate(["--mode", "sequential", "--workdir", trained, "--no_progress"] + args) == 1
    _one_error_line(capsys, want)


def test_train_cli_flag_errors_print_no_traceback(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT}
  (tmp_path / "bad.py").write_text("from configs import nosuch\n")
  for args, want in ((["--config=configs/digits.py", "--config.nosuch=1"], "--config.nosuch=1"),
                     ([f"--config={tmp_path / 'bad.py'}"], "put that directory on PYTHONPATH"),
                     (["--config=configs/nope.py"], "no such config file"),
                     ([], "--config is required")):
    r = subprocess.run([sys.executable, "train.py", *args, f"--workdir={tmp_path}/w"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], lines
