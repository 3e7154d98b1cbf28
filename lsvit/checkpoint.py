"""Orbax checkpoints: converted weights, and a training run's latest/best states.

Layout of a training workdir:
  checkpoints/<step>/{state,meta}   latest states (every ``checkpoint_every`` epochs)
  best/<step>/{params,meta}         the lowest validation cross-entropy so far
  config.json, model.json, metrics.jsonl, events.*

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed while saving leaves the previous good step in place.
A converted checkpoint (``lsvit.convert``) is ``params/`` + ``model.json``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  pass


def refuse_existing(directory: str):
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} exists and is not empty; refusing to overwrite it. "
                          "Choose a new --out directory or remove the old one yourself.")


def write_json(path: str, obj):
  """Atomically (write, then rename): a crash never leaves half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def save_params(directory: str, params, model_cfg: dict, **meta):
  """A converted (pretrained) checkpoint that training can start from."""
  refuse_existing(directory)
  path = epath.Path(directory).absolute()
  path.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "params", params)
  write_json(os.path.join(directory, "model.json"), dict(model=model_cfg, **meta))


def load_model_cfg(directory: str) -> dict:
  path = os.path.join(directory, "model.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{directory} is not an lsvit checkpoint or training workdir "
                          "(no model.json). Create one with `python -m lsvit.convert` or train.py.")
  return json.load(open(path))["model"]


def load_params(directory: str):
  """(params, model cfg) from a converted checkpoint or the best state of a workdir."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  cfg = load_model_cfg(directory)
  path = epath.Path(directory).absolute()
  if (path / "params").exists():
    try:
      target = local_target(path / "params")
      with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path / "params", target), cfg
    except Exception as e:
      raise CheckpointError(f"could not restore {path / 'params'}: {e}") from e
  if (path / "best").exists():
    return restore_best(directory)[0], cfg
  raise CheckpointError(f"{directory} has neither params/ nor best/: nothing to restore")


def check_same_model(saved: dict, current: dict, where: str):
  keys = sorted(set(saved) | set(current))
  diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
          for k in keys if saved.get(k) != current.get(k)]
  if diff:
    raise CheckpointError(f"the checkpoint in {where} was made for a different model:\n  " +
                          "\n  ".join(diff) + "\nUse a new --workdir, or the original config.")


def _manager(directory: epath.Path, keep: Optional[int], items):
  return ocp.CheckpointManager(
      directory, item_names=items,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


class RunCheckpoints:
  """The latest training states and the best parameters of one workdir."""

  def __init__(self, workdir: str, keep_latest: int = 2):
    root = epath.Path(workdir).absolute()
    self.workdir = str(root)
    self.latest = _manager(root / "checkpoints", keep_latest, ("state", "meta"))
    self.best = _manager(root / "best", 1, ("params", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  # Saves are asynchronous, but one manager's save waits for the other's: with several
  # processes, two managers' barriers in flight at once deadlock Orbax.
  def save_latest(self, step: int, state: Any, meta: dict):
    self.best.wait_until_finished()
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def save_best(self, step: int, params: Any, meta: dict):
    self.latest.wait_until_finished()
    self.best.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)), force=True)

  def best_meta(self) -> Optional[dict]:
    step = self.best.latest_step()
    if step is None:
      return None
    return self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state):
    step = self.latest.latest_step()
    try:
      r = self.latest.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(
          f"could not restore the latest checkpoint {self.workdir}/checkpoints/{step}: "
          f"{type(e).__name__}: {str(e)[:500]}\nIt may be corrupt or from another model. Move that "
          f"step directory aside to resume from the one before it (nothing is deleted for you).") from e
    return r["state"], r["meta"]

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


def local_target(item_dir) -> Any:
  """An abstract tree placing a saved item on this process's first device, whatever
  topology (devices, hosts) it was saved from."""
  import jax
  with ocp.StandardCheckpointer() as c:
    md = c.metadata(item_dir)
  tree = getattr(md, "item_metadata", md)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)


def restore_best(workdir: str, abstract_params=None):
  """(params, meta) of a workdir's best checkpoint (on one local device by default)."""
  root = epath.Path(workdir).absolute() / "best"
  mngr = _manager(root, 1, ("params", "meta"))
  step = mngr.latest_step()
  if step is None:
    mngr.close()
    raise CheckpointError(f"{workdir} has no best checkpoint yet (best/ is empty): "
                          "has the run finished an epoch?")
  try:
    if abstract_params is None:
      abstract_params = local_target(root / str(step) / "params")
    r = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
  except Exception as e:
    raise CheckpointError(f"could not restore {workdir}/best/{step}: {e}") from e
  finally:
    mngr.close()
  return r["params"], r["meta"]
