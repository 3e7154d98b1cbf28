"""Orbax checkpoints: converted weights, and a training run's latest/best states.

Layout of a training workdir:
  checkpoints/<step>/{state,meta}   latest states (every ``checkpoint_every`` epochs)
  best/<step>/{params,meta}         the lowest validation cross-entropy so far
  config.json, model.json, metrics.jsonl, events.*

Orbax writes each step to a temporary directory and renames it when complete, so a run
killed while saving leaves the previous good step in place. Once a step is complete it is
*sealed*: ``lsvit_sha256.json`` in the step directory records the size and SHA-256 of every
file in it. Every restore verifies the seal first, so any change of a stored byte is found
before Orbax reads the arrays. A converted checkpoint (``lsvit.convert``) is ``params/``
(sealed the same way) + ``model.json``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import orbax.checkpoint as ocp
from etils import epath

SEAL = "lsvit_sha256.json"
SEAL_FORMAT = "lsvit-sha256-1"
# model.json's marker that the directory's checkpoints are sealed (older lsvit wrote none).
SEALED_KEY = "checkpoint_seal"


class CheckpointError(RuntimeError):
  pass


def refuse_existing(directory: str):
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise FileExistsError(f"{directory} exists and is not empty; refusing to overwrite it. "
                          "Choose a new --out directory or remove the old one yourself.")


def write_json(path: str, obj):
  """Atomically (write, then rename): a crash never leaves half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- seals

def _digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(directory: str) -> List[str]:
  out = []
  for root, _, names in os.walk(directory):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), directory)
      if rel != SEAL:
        out.append(rel)
  return sorted(out)


def _seal_text(files: dict) -> str:
  return json.dumps({"format": SEAL_FORMAT, "files": files}, indent=1, sort_keys=True) + "\n"


def seal(directory) -> None:
  """Records size and SHA-256 of every file under ``directory`` (a complete step)."""
  directory = str(directory)
  paths = {rel: os.path.join(directory, rel) for rel in _files(directory)}
  files = {rel: [os.path.getsize(p), _digest(p)] for rel, p in paths.items()}
  tmp = os.path.join(directory, SEAL + ".tmp")
  with open(tmp, "w") as f:
    f.write(_seal_text(files))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, SEAL))


def seal_problem(directory) -> Optional[str]:
  """None if every file under ``directory`` is as sealed; else what differs, in words."""
  directory = str(directory)
  path = os.path.join(directory, SEAL)
  if not os.path.exists(path):
    return "it has no checksum record (its save was interrupted)"
  try:
    text = open(path, "rb").read().decode()
    files = json.loads(text)["files"]
    if text != _seal_text(files):  # a changed byte that still parses
      raise ValueError
  except (ValueError, KeyError, TypeError, UnicodeDecodeError):
    return f"its checksum record {SEAL} is damaged"
  present = set(_files(directory))
  problems = [f"{rel} is missing" for rel in sorted(set(files) - present)]
  problems += [f"{rel} was added" for rel in sorted(present - set(files))]
  for rel in sorted(present & set(files)):
    size, digest = files[rel]
    full = os.path.join(directory, rel)
    if os.path.getsize(full) != size:
      problems.append(f"{rel} changed size ({size} -> {os.path.getsize(full)} bytes)")
    elif _digest(full) != digest:
      problems.append(f"{rel} changed (checksum mismatch)")
  if problems:
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "its stored bytes changed: " + "; ".join(problems[:3]) + more
  return None


def is_sealed_dir(directory: str) -> bool:
  """Whether ``directory`` (a workdir or converted checkpoint) was written with seals."""
  path = os.path.join(directory, "model.json")
  try:
    return bool(json.load(open(path)).get(SEALED_KEY))
  except (OSError, ValueError):
    return False


def _warn_unsealed(where: str):
  print(f"warning: {where} was written by an lsvit without checksums: its bytes cannot be "
        f"verified", file=sys.stderr)


def _drop_orbax_leftovers(unraisable):
  """An unraisable-exception hook that drops what Orbax's abandoned read coroutines raise
  when collected (pages of TensorStore specs) and passes anything else on."""
  where = getattr(unraisable.exc_traceback, "tb_frame", None)
  if "orbax" in repr(unraisable.object) or (where and "orbax" in where.f_code.co_filename):
    return
  sys.__unraisablehook__(unraisable)


class _MainThreadOnly:
  """sys.stderr for the main thread; other threads' writes dropped."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text):
    if threading.current_thread() is threading.main_thread():
      return self.stream.write(text)
    return len(text)

  def __getattr__(self, name):
    return getattr(self.stream, name)


@contextlib.contextmanager
def _quiet_orbax_failure():
  """A failed Orbax restore leaves reader threads and coroutines that print tracebacks
  (TensorStore specs, 'Event loop is closed') for a while, at exit too: while restoring,
  and for good after a failure, only the main thread's stderr gets through, so the user
  sees the one line we print."""
  original = sys.stderr
  sys.stderr = _MainThreadOnly(original)
  try:
    yield
  except Exception:
    sys.unraisablehook = _drop_orbax_leftovers
    raise
  else:
    sys.stderr = original


def exit_process(code: int):
  """Ends a command with ``code``. After a failed restore Orbax's reader threads would print
  tracebacks as Python shuts down, so an error exits at once (the one-line error is out)."""
  if code:
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def _first_line(e: Exception) -> str:
  text = str(e).split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------- converted weights

def save_params(directory: str, params, model_cfg: dict, **meta):
  """A converted (pretrained) checkpoint that training can start from."""
  refuse_existing(directory)
  path = epath.Path(directory).absolute()
  path.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "params", params)
  seal(path / "params")
  write_json(os.path.join(directory, "model.json"),
             dict(model=model_cfg, **{SEALED_KEY: SEAL_FORMAT}, **meta))


def load_model_cfg(directory: str) -> dict:
  path = os.path.join(directory, "model.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{directory} is not an lsvit checkpoint or training workdir "
                          "(no model.json). Create one with `python -m lsvit.convert` or train.py.")
  try:
    return json.load(open(path))["model"]
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"{path} is damaged ({_first_line(e)})") from None


def load_params(directory: str):
  """(params, model cfg) from a converted checkpoint or the best state of a workdir."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  cfg = load_model_cfg(directory)
  path = epath.Path(directory).absolute()
  if (path / "params").exists():
    if is_sealed_dir(directory):
      problem = seal_problem(path / "params")
      if problem:
        raise CheckpointError(f"refusing to load {path / 'params'}: {problem}. Convert the "
                              f"source again (python -m lsvit.convert) or restore a backup.")
    else:
      _warn_unsealed(str(path / "params"))
    try:
      with _quiet_orbax_failure():
        target = local_target(path / "params")
        with ocp.StandardCheckpointer() as ckptr:
          return ckptr.restore(path / "params", target), cfg
    except Exception as e:
      raise CheckpointError(f"could not restore {path / 'params'}: {_first_line(e)}") from None
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


# ----------------------------------------------------------------------------- training runs

def _manager(directory: epath.Path, keep: Optional[int], items):
  return ocp.CheckpointManager(
      directory, item_names=items,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def _usable_steps(mngr, kind: str, sealed: bool) -> Tuple[List[int], List[Tuple[int, str]]]:
  """Steps newest first whose seal holds (all steps for an unsealed directory), and the
  (step, problem) of the others."""
  good, bad = [], []
  mngr.reload()
  for step in sorted(mngr.all_steps(), reverse=True):
    problem = seal_problem(mngr.directory / str(step)) if sealed else None
    (bad.append((step, problem)) if problem else good.append(step))
  return good, bad


def _damaged_best(workdir: str, step: int, problem: str, older: List[int]) -> CheckpointError:
  fix = (f"move best/{step} out of {workdir}/best to use the previous best (best/{older[0]})"
         if older else "restore it from a backup or train the run again in a new --workdir")
  return CheckpointError(f"refusing to use {workdir}/best/{step}: {problem}. "
                         f"Restore it from a backup, or {fix}.")


class RunCheckpoints:
  """The latest training states and the best parameters of one workdir.

  Two latest states and two bests are kept, so that while a new step is being saved and
  sealed the previous sealed one still exists."""

  def __init__(self, workdir: str, keep_latest: int = 2, log: Callable = print):
    if keep_latest < 2:
      raise ValueError(f"keep_checkpoints={keep_latest}: at least 2 are kept, so that a run "
                       "stopped while saving still has a verified checkpoint; set it to >= 2")
    root = epath.Path(workdir).absolute()
    self.workdir = str(root)
    self.log = log
    self.sealed = is_sealed_dir(self.workdir)
    self.latest = _manager(root / "checkpoints", keep_latest, ("state", "meta"))
    self.best = _manager(root / "best", 2, ("params", "meta"))
    if not self.sealed and (self.latest.all_steps() or self.best.all_steps()):
      _warn_unsealed(self.workdir)

  def _save(self, mngr, other, step: int, args):
    other.wait_until_finished()  # with several processes, two managers' barriers deadlock Orbax
    mngr.save(step, args=args, force=True)
    mngr.wait_until_finished()  # the seal needs the finished step: saving is synchronous
    import jax
    if jax.process_index() == 0:
      seal(mngr.directory / str(step))
    sync("lsvit_seal")

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def save_latest(self, step: int, state: Any, meta: dict):
    self._save(self.latest, self.best, step, ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def save_best(self, step: int, params: Any, meta: dict):
    self._save(self.best, self.latest, step, ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

  def _set_aside(self, mngr, kind: str, step: int, problem: str, then: str):
    """Moves a step that cannot be used out of Orbax's way (never deletes it)."""
    import jax
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(self.workdir, "set_aside", f"{kind}_{step}_{stamp}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(str(mngr.directory / str(step)), dest)
    sync("lsvit_set_aside")
    mngr.reload()
    self.log(f"warning: {self.workdir}/{kind}/{step}: {problem}; moved to {dest}; {then}")

  def resume_point(self) -> Optional[int]:
    """The newest latest state whose seal holds; newer ones are set aside, saying why, and
    so are best steps after it (the resumed run saves them again)."""
    good, bad = _usable_steps(self.latest, "checkpoints", self.sealed)
    then = f"resuming from step {good[0]}" if good else "starting from the beginning"
    for step, problem in bad:
      if not good or step > good[0]:
        self._set_aside(self.latest, "checkpoints", step, problem, then)
    resume = good[0] if good else None
    self.best.reload()
    for step in self.best.all_steps():
      if resume is None or step > resume:
        self._set_aside(self.best, "best", step, "it was saved after the point the run resumes "
                        "from, which will save it again", then)
    return resume

  def best_meta(self) -> Optional[dict]:
    """The meta of the best step (the newest with a holding seal). A best step left unsealed
    by an interrupted save is set aside; a damaged one is refused."""
    good, bad = _usable_steps(self.best, "best", self.sealed)
    for step, problem in bad:
      if good and step < good[0]:
        continue
      if "interrupted" not in problem:
        raise _damaged_best(self.workdir, step, problem, good)
      self._set_aside(self.best, "best", step, problem,
                      f"the best so far is best/{good[0]}" if good else "no best yet")
    if not good:
      return None
    return self.best.restore(good[0], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, step: int, abstract_state):
    try:
      with _quiet_orbax_failure():
        r = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(
          f"could not restore {self.workdir}/checkpoints/{step}: {_first_line(e)}. It may be "
          f"from another model; move that step directory aside to resume from the one before "
          f"it (nothing is deleted for you).") from None
    return r["state"], r["meta"]

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


def sync(name: str):
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


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
  """(params, meta) of a workdir's best checkpoint (on one local device by default),
  after verifying its seal: a best step whose bytes changed is refused, never used."""
  root = epath.Path(workdir).absolute() / "best"
  mngr = _manager(root, None, ("params", "meta"))
  try:
    sealed = is_sealed_dir(workdir)
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"{workdir} has no best checkpoint yet (best/ is empty): "
                            "has the run finished an epoch?")
    step = steps[0]
    if sealed:
      problem = seal_problem(root / str(step))
      if problem:
        raise _damaged_best(workdir, step, problem, steps[1:])
    else:
      _warn_unsealed(f"{workdir}/best/{step}")
    try:
      with _quiet_orbax_failure():
        if abstract_params is None:
          abstract_params = local_target(root / str(step) / "params")
        r = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"could not restore {workdir}/best/{step}: {_first_line(e)}") from None
  finally:
    mngr.close()
  return r["params"], r["meta"]
