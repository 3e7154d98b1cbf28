"""What ``train.py`` does: optional multi-host start-up, the optional sequential
pretraining stage (digits), training, and clear errors instead of tracebacks."""
from __future__ import annotations

import os
import sys

import jax

from lsvit import checkpoint as ckpt_lib
from lsvit import convert
from lsvit import data as data_lib
from lsvit import train_lib

USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, data_lib.DataError,
               ckpt_lib.CheckpointError, convert.ConversionError, train_lib.TrainingDiverged)


def pretrain_config(config):
  """Stage 1: the same model trained sequentially (variant baseline), from scratch."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.variant = "baseline"
    c.num_epochs = config.pretrain_epochs
    c.optimizer.lr = config.get("pretrain_lr", config.optimizer.lr)
    c.pretrain_epochs = 0
    c.init_from = ""
  return c


def train(config, workdir: str) -> dict:
  """Runs all stages; returns {'pretrain': summary, 'main': summary} (pretrain if configured)."""
  if config.get("distributed"):
    # On SLURM/Open MPI/TPU pods every argument is auto-detected; elsewhere set them
    # (or JAX_COORDINATOR_ADDRESS) and start the same command on every host.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only hosts
    jax.distributed.initialize(
        coordinator_address=config.get("coordinator_address") or None,
        num_processes=config.get("num_processes") or None,
        process_id=None if config.get("process_id", -1) < 0 else config.process_id)
  out = {}
  if config.get("pretrain_epochs") and not config.get("init_from"):
    pre_dir = os.path.join(workdir, "pretrain")
    print(f"== stage 1: sequential pretraining ({config.pretrain_epochs} epochs) in {pre_dir}")
    out["pretrain"] = train_lib.train_and_evaluate(pretrain_config(config), pre_dir)
    if config.get("refine_from_pretrain"):
      config = config.copy_and_resolve_references()
      with config.unlocked():
        config.init_from = pre_dir
    print(f"== stage 2: {config.variant} in {workdir}")
  out["main"] = train_lib.train_and_evaluate(config, workdir)
  if "pretrain" in out and jax.process_index() == 0:
    for name, s in out.items():
      print(f"{name:>9} [{s['variant']}]: sequential top-1 {s['sequential']['top1']:.1%}, "
            f"arbitrary order top-1 {s['arbitrary']['top1']:.1%}")
  return out


def quiet_logs():
  """Orbax logs every save/restore at INFO through absl; keep the console to our progress."""
  import logging
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  for name in ("absl", "orbax", "jax._src.distributed"):
    logging.getLogger(name).setLevel(logging.ERROR)


def main(config, workdir: str) -> int:
  quiet_logs()
  try:
    train(config, workdir)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0
