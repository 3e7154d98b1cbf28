import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from lsvit import checkpoint as ckpt_lib
from lsvit import train_lib
from tests.helpers import ROOT, leaves, max_diff, tiny_config


def run_py(code, env=None, timeout=600):
  env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


FOUR_DEVICES = r"""
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from lsvit import train_lib, model as model_lib
from tests.helpers import tiny_config
config = tiny_config(variant="layershuffle", **{"model.dropout": 0.1})

def run_steps(devices, n=6):
  setup = train_lib.build_setup(config, Mesh(np.asarray(devices), ("data",)))
  params = model_lib.init_params(setup.model, 0)
  state = setup.placement.replicate({"step": jnp.zeros((), jnp.int32), "params": params,
                                     "opt_state": setup.tx.init(params)})
  for batch in setup.train_loader.iterate(0, n):
    state, m = setup.train_step(state, setup.placement.to_global(batch))
  return jax.device_get(state["params"]), state["params"]

p4, live = run_steps(jax.devices())
p1, _ = run_steps(jax.devices()[:1])
diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)))
moved = max(float(np.abs(a - b).max()) for a, b in zip(
    jax.tree.leaves(p1), jax.tree.leaves(model_lib.init_params(model_lib.build(
        train_lib.model_config(config, 10)), 0))))
try:
  train_lib.build_setup(tiny_config(batch_size=30))
  err = None
except ValueError as e:
  err = str(e)
print(json.dumps({"devices": len(jax.devices()), "used": len(live["head"]["kernel"].sharding.device_set),
                  "diff": diff, "moved": moved, "error": err}))
"""


@pytest.mark.slow
def test_four_devices_match_one_device():
  out = run_py(FOUR_DEVICES, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  r = json.loads(out.strip().splitlines()[-1])
  assert r["devices"] == 4 and r["used"] == 4
  assert r["moved"] > 1e-3  # the steps really changed the parameters
  assert r["diff"] < 1e-5, r  # same global batch, permutation and dropout: same parameters
  assert "batch_size=30 is not divisible by the 4 devices" in r["error"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_match_one(tmp_path):
  port = _free_port()
  workdir = str(tmp_path / "multi")
  env = {**os.environ, "PYTHONPATH": ROOT}
  procs = [subprocess.Popen([sys.executable, "tests/distributed_worker.py", str(i), str(port), workdir],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  assert "process 0: sequential top-1" in outs[0][0]
  single = str(tmp_path / "single")
  train_lib.train_and_evaluate(tiny_config(), single, log=lambda *a: None)
  multi_params, multi_meta = ckpt_lib.restore_best(workdir)
  single_params, single_meta = ckpt_lib.restore_best(single)
  assert multi_meta["epoch"] == single_meta["epoch"]
  assert max_diff(multi_params, single_params) < 1e-5
  assert abs(multi_meta["val"]["loss"] - single_meta["val"]["loss"]) < 1e-5


def _state_params(workdir, step):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as c:
    return c.restore(epath.Path(workdir).absolute() / "checkpoints" / str(step) / "state")["params"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
  # the digits model at batch 4 (359 steps, about 5 s an epoch here): the kill, 1 s after
  # the first checkpoint appears, lands well inside epoch 2
  args = ["--config=configs/digits.py", "--config.pretrain_epochs=0", "--config.progress=False",
          "--config.batch_size=4", "--config.num_epochs=2", "--config.eval_orders=1",
          "--config.model.dropout=0.1"]
  env = {**os.environ, "PYTHONPATH": ROOT}
  train = lambda wd: [sys.executable, "train.py", *args, f"--workdir={wd}"]
  full = str(tmp_path / "full")
  subprocess.run(train(full), cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  spe = 1438 // 4
  final = 2 * spe
  assert (tmp_path / "full" / "checkpoints" / str(final)).exists()

  killed = str(tmp_path / "killed")
  p = subprocess.Popen(train(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  first = tmp_path / "killed" / "checkpoints" / str(spe)
  deadline = time.time() + 300
  while not first.exists() and time.time() < deadline and p.poll() is None:
    time.sleep(0.05)
  time.sleep(1.0)  # into the second epoch
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  assert first.exists() and not (tmp_path / "killed" / "checkpoints" / str(final)).exists()
  lines = open(os.path.join(killed, "metrics.jsonl")).read().splitlines()
  assert len(lines) == 1  # killed during epoch 2

  r = subprocess.run(train(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resuming from {killed}/checkpoints/{spe}" in r.stdout + r.stderr
  epochs = [json.loads(l)["epoch"] for l in open(os.path.join(killed, "metrics.jsonl"))]
  assert epochs == [1, 2]
  assert max_diff(_state_params(full, final), _state_params(killed, final)) <= 1e-6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  import jax.numpy as jnp
  orig = train_lib.make_train_step
  config = tiny_config(num_epochs=3)
  bad_from = 45 * 1 + 5  # epoch 1 has 44 steps of 32: NaN from step 50, in epoch 2

  def poisoned(model, tx, cfg):
    step = orig(model, tx, cfg)

    def wrapped(state, batch):
      new, m = step(state, batch)
      m["loss"] = jnp.where(state["step"] >= bad_from, jnp.nan, m["loss"])
      m["nonfinite"] = (~jnp.isfinite(m["loss"])).astype(jnp.int32)
      return new, m
    return wrapped

  monkeypatch.setattr(train_lib, "make_train_step", poisoned)
  with pytest.raises(train_lib.TrainingDiverged) as e:
    train_lib.train_and_evaluate(config, str(tmp_path), log=lambda *a: None)
  assert "NaN/inf" in str(e.value) and "last good checkpoint (step 44)" in str(e.value)
  ckpts = ckpt_lib.RunCheckpoints(str(tmp_path))
  assert ckpts.latest.all_steps() == [44]
  ckpts.close()
  assert all(np.isfinite(x).all() for x in leaves(_state_params(str(tmp_path), 44)))


def test_resume_refuses_other_config_and_continues_with_more_epochs(tmp_path):
  wd = str(tmp_path)
  s1 = train_lib.train_and_evaluate(tiny_config(num_epochs=1), wd, log=lambda *a: None)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    train_lib.train_and_evaluate(tiny_config(num_epochs=1, **{"optimizer.lr": 5e-4}), wd)
  assert "optimizer.lr: 0.001 -> 0.0005" in str(e.value) and "new --workdir" in str(e.value)
  logs = []
  s2 = train_lib.train_and_evaluate(tiny_config(num_epochs=2), wd, log=logs.append)
  assert any("resuming from" in l for l in logs)
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [l["epoch"] for l in lines] == [1, 2]
  assert s2["sequential"]["examples"] == 359
  assert set(s1) == {"workdir", "best_epoch", "variant", "sequential", "arbitrary"}


def test_corrupt_only_checkpoint_is_set_aside_and_training_starts_over(tmp_path):
  wd = str(tmp_path)
  train_lib.train_and_evaluate(tiny_config(num_epochs=1), wd, log=lambda *a: None)
  state_dir = tmp_path / "checkpoints" / "44" / "state"
  for f in state_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(b"garbage")
  logs = []
  train_lib.train_and_evaluate(tiny_config(num_epochs=1), wd, log=logs.append)
  said = "\n".join(logs)
  assert "checkpoints/44: its stored bytes changed" in said and "starting from the beginning" in said
  aside = sorted(os.listdir(tmp_path / "set_aside"))  # kept, not deleted
  assert [n.split("_2")[0] for n in aside] == ["best_44", "checkpoints_44"]
  assert ckpt_lib.seal_problem(tmp_path / "checkpoints" / "44") is None  # saved again


def test_init_from_converted_hf_checkpoint_with_kept_layers(tmp_path):
  """init_from an HF checkpoint converted on the fly: encoder weights taken over, the
  first k layers kept, a new zero head for the 10 digit classes; then it trains."""
  from transformers import ViTConfig, ViTForImageClassification
  from lsvit import convert
  from tests import reference
  hf = reference.randomize(ViTForImageClassification(ViTConfig(
      hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
      image_size=8, patch_size=2, num_channels=1, num_labels=5)))
  hf.save_pretrained(tmp_path / "hf")
  converted, _ = convert.load(f"hf:{tmp_path / 'hf'}")
  config = tiny_config(init_from=f"hf:{tmp_path / 'hf'}", keep_layers=2, num_epochs=1,
                       **{"model.ln_eps": 1e-12})
  setup = train_lib.build_setup(config)
  assert setup.model.depth == 2 and setup.model.num_classes == 10
  params = train_lib.initial_params(config, setup.model, log=lambda *a: None)
  want = converted["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_1"]["kernel"][:2]
  np.testing.assert_array_equal(params["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_1"]["kernel"], want)
  np.testing.assert_array_equal(params["embedding"]["kernel"], converted["embedding"]["kernel"])
  assert params["head"]["kernel"].shape == (32, 10) and not np.asarray(params["head"]["kernel"]).any()
  train_lib.train_and_evaluate(config, str(tmp_path / "run"), log=lambda *a: None)
  trained, _ = ckpt_lib.restore_best(str(tmp_path / "run"))
  assert trained["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape[0] == 2
  assert max_diff(trained["embedding"], params["embedding"]) > 1e-4  # it trained from there


def test_bfloat16_compute_keeps_float32_params(digits_batch):
  import jax.numpy as jnp
  from lsvit import model as model_lib
  config = tiny_config(compute_dtype="bfloat16")
  m32 = model_lib.build({**train_lib.model_config(config, 10), "dtype": "float32"})
  m16 = model_lib.build(train_lib.model_config(config, 10))
  assert m16.dtype == jnp.bfloat16
  params = model_lib.init_params(m16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  x = digits_batch[0][:16]
  params = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(1), a.shape), params)
  a = np.asarray(m32.apply({"params": params}, x)["logits"])
  b = m16.apply({"params": params}, x)["logits"]
  assert b.dtype == jnp.float32  # logits come back in f32 for the loss
  assert np.abs(a - np.asarray(b)).max() < 0.05 * np.abs(a).max() + 1e-3
