"""The training loop (``train.py`` is a thin wrapper around ``train_and_evaluate``).

Data parallelism: ``jax.jit`` over a 1-D device mesh ('data'), parameters and
optimizer state replicated, batches sharded on their leading axis. This is what
``pmap`` did, in today's form: the same program runs on one CPU, 8 GPUs or
several hosts (``jax.distributed``), XLA inserts the gradient all-reduce, and
a replicated scalar key makes every device draw the same layer permutation.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lsvit import checkpoint as ckpt_lib
from lsvit import convert
from lsvit import data as data_lib
from lsvit import model as model_lib
from lsvit import order as order_lib

# Fields that may change when a run is resumed (everything else must match).
RESUMABLE_FIELDS = ("num_epochs", "log_every_steps", "eval_orders", "progress", "data.num_threads")
# Fields added to configs/default.py after runs were saved, and the value those runs had in
# effect: a saved config without one matches a config holding this value (tested).
ADDED_FIELDS = {"model.name": "", "model.width": 0, "model.depth": 0, "model.mlp_dim": 0,
                "model.num_heads": 0, "model.patch_size": 0, "pretrain_epochs": 0,
                "pretrain_lr": 1e-3, "refine_from_pretrain": True, "best_by": "sequential",
                "model.pos_table_init": "normal", "model.predict_head_init": "zeros",
                "model.deit_head": "mean"}
# The same for model.json, whose fields are the model's (the ViT defaults, what those runs
# computed).
ADDED_MODEL_FIELDS = {k[len("model."):]: v for k, v in ADDED_FIELDS.items()
                      if k.startswith("model.") and k[len("model."):] in model_lib.MODEL_FIELDS}


class TrainingDiverged(RuntimeError):
  pass


# ----------------------------------------------------------------------------- set-up

def model_config(config, num_classes: int) -> dict:
  """The model fields of ``config`` (decoded 'B/16' name, variant, dtype, depth kept)."""
  cfg = dict(config.model)
  name = cfg.pop("name")
  given = {k: cfg.pop(k) for k in model_lib.DIMENSIONS if cfg[k]}  # 0: from the name
  for k in model_lib.DIMENSIONS:
    cfg.pop(k, None)
  dims = {**(model_lib.decode_name(name) if name else {}), **given}
  missing = [k for k in model_lib.DIMENSIONS if k not in dims]
  if missing:
    raise ValueError(f"model.{missing[0]} is 0 and model.name is empty: set model.name (e.g. "
                     f"'B/16') or model.{', model.'.join(missing)}")
  cfg = {**dims, **cfg}
  cfg.update(variant=config.variant, pos_table=config.pos_table, dtype=config.compute_dtype)
  if config.keep_layers:
    cfg["depth"] = int(config.keep_layers)
  if not cfg.get("num_classes"):
    cfg["num_classes"] = num_classes
  return cfg


def make_optimizer(config, total_steps: int):
  o = config.optimizer
  if o.schedule == "linear":  # HF Trainer default: linear decay to zero, optional warm-up
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1)),
         optax.linear_schedule(o.lr, 0.0, max(total_steps - o.warmup_steps, 1))],
        [o.warmup_steps]) if o.warmup_steps else optax.linear_schedule(o.lr, 0.0, total_steps)
  elif o.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup_steps, 1), total_steps)
  elif o.schedule == "constant":
    lr = o.lr
  else:
    raise ValueError(f"unknown schedule {o.schedule!r}: linear, cosine or constant")
  parts = []
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
  return optax.chain(*parts), lr


def initial_params(config, model, log=print):
  init = model_lib.init_params(model, config.seed)
  src = config.init_from
  if not src:
    if config.keep_layers:
      raise ValueError("keep_layers needs a pretrained model to keep layers of: set init_from")
    return init
  if src.split(":", 1)[0] in ("hf", "timm", "npz"):
    params, _ = convert.load(src)
  else:
    params, _ = ckpt_lib.load_params(src)
  log(f"initialising from {src}")
  return convert.adapt(params, init, model, config.keep_layers or None, config.keep_method)


def _flatten_cfg(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten_cfg(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _check_resumable(saved: dict, current: dict, workdir: str):
  a, b = _flatten_cfg(saved), _flatten_cfg(current)
  a.update({k: v for k, v in ADDED_FIELDS.items() if k not in a})
  diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS]
  if diff:
    raise ckpt_lib.CheckpointError(
        f"{workdir} holds a run with a different config; refusing to mix them:\n  " +
        "\n  ".join(diff) + "\nUse a new --workdir (or the original config to resume).")


def _has(workdir: str, name: str) -> bool:
  path = os.path.join(workdir, name)
  return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))


def check_workdir_identity(workdir: str, cfg_dict: dict, model_cfg: dict) -> bool:
  """Refuses a workdir holding another run's results, whichever of its files exist.
  Returns whether to (re)write config.json and model.json: a new workdir, or one whose
  run stopped before saving anything."""
  trained = [n for n in ("checkpoints", "best", "summary.json") if _has(workdir, n)]
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    if trained or _has(workdir, "model.json"):
      raise ckpt_lib.CheckpointError(
          f"{workdir} holds a run's files ({', '.join(trained or ['model.json'])}) but no "
          f"config.json, so they cannot be checked against this config; refusing to mix "
          f"them. Use a new --workdir.")
    return True
  if not trained:
    return True
  try:
    saved = json.load(open(cfg_path))
  except ValueError:
    raise ckpt_lib.CheckpointError(f"{cfg_path} is damaged; cannot tell which run {workdir} "
                                   f"holds. Use a new --workdir.") from None
  _check_resumable(saved, cfg_dict, workdir)
  ckpt_lib.check_same_model({**ADDED_MODEL_FIELDS, **ckpt_lib.load_model_cfg(workdir)},
                            model_cfg, workdir)
  return False


def ensure_writable(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ckpt_lib.CheckpointError(f"cannot write to workdir {workdir} ({e.strerror or e}); "
                                   f"choose a writable --workdir") from None


def check_config(config):
  """Settings that would otherwise fail late or train something else than asked."""
  for name in ("batch_size", "eval_batch_size", "num_epochs"):
    if not isinstance(config[name], int) or config[name] <= 0:
      raise ValueError(f"{name}={config[name]!r}: must be a positive whole number")
  if config.best_by not in ("auto", "sequential", "arbitrary"):
    raise ValueError(f"best_by={config.best_by!r}: choose auto, sequential or arbitrary")
  if config.keep_checkpoints < 2:
    raise ValueError(f"keep_checkpoints={config.keep_checkpoints}: at least 2 are kept, so "
                     "that a run stopped while saving still has a verified checkpoint")


# ----------------------------------------------------------------------------- steps

def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def position_ce(pos_logits):
  """[n, B]: CE of each executed layer's prediction of the position it ran at; pos_logits
  [n, B, L]."""
  target = jnp.broadcast_to(jnp.arange(pos_logits.shape[0])[:, None], pos_logits.shape[:2])
  return cross_entropy(pos_logits, target)


def over_layers(values, reduction: str):
  """``values`` [n, ...] reduced over the executed layers as predict_loss_reduction says."""
  if reduction == "sum":  # the paper's formula
    return values.sum(axis=0)
  if reduction == "mean":  # the authors' code
    return values.mean(axis=0)
  raise ValueError(f"unknown predict_loss_reduction {reduction!r}: mean or sum")


def position_loss(pos_logits, reduction: str):
  """(the position loss, its per-layer values [n]) of a batch."""
  per_layer = position_ce(pos_logits).mean(axis=1)
  return over_layers(per_layer, reduction), per_layer


def make_train_step(model, tx, config):
  depth = model.depth

  def train_step(state, batch):
    # Same key on every device and host: a function of (seed, step) only.
    step_key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
    order_key, dropout_key = jax.random.split(step_key)
    order, active = order_lib.training_order(config.variant, order_key, depth,
                                             config.layerdrop)

    def loss_fn(params):
      out = model.apply({"params": params}, batch["image"], order, train=True, active=active,
                        rngs={"dropout": dropout_key})
      ce = cross_entropy(out["logits"], batch["label"]).mean()
      metrics = {"ce": ce, "accuracy": (out["logits"].argmax(-1) == batch["label"]).mean()}
      loss = ce
      if "pos_logits" in out:
        pos, _ = position_loss(out["pos_logits"], config.predict_loss_reduction)
        loss = loss + config.predict_loss_weight * pos
        metrics["position_ce"] = pos
        metrics["position_accuracy"] = (out["pos_logits"].argmax(-1) ==
                                        jnp.arange(order.shape[0])[:, None]).mean()
      metrics["loss"] = loss
      return loss, metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["nonfinite"] = (~jnp.isfinite(metrics["loss"])).astype(jnp.int32)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


def classification_sums(logits, labels, mask) -> dict:
  """Sums (not means) of CE, top-1 and top-5 hits and examples over the rows ``mask`` keeps,
  so that padded batches and several hosts add up exactly."""
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return {"ce": (cross_entropy(logits, labels) * mask).sum(),
          "top1": ((logits.argmax(-1) == labels) & mask).sum(),
          "top5": ((top5 == labels[:, None]).any(-1) & mask).sum(),
          "count": mask.sum()}


def make_eval_step(model, position_reduction: str = "mean"):
  def eval_step(params, batch, order):
    out = model.apply({"params": params}, batch["image"], order)
    sums = classification_sums(out["logits"], batch["label"], batch["mask"])
    if "pos_logits" in out:
      pos = out["pos_logits"]
      hit = pos.argmax(-1) == jnp.arange(order.shape[0])[:, None]
      sums["position_hits"] = (hit & batch["mask"][None]).sum(axis=1)  # per position [n]
      # each example's position loss, reduced over layers as in training (position_loss)
      per_example = over_layers(position_ce(pos), position_reduction)
      sums["position_ce"] = (per_example * batch["mask"]).sum()
    return sums

  return eval_step


# ----------------------------------------------------------------------------- placement

@dataclasses.dataclass(frozen=True)
class Placement:
  """Where arrays live: parameters replicated on every device of a 1-D mesh ('data'),
  batches split over it on their leading axis."""
  mesh: Mesh

  @property
  def replicated(self):
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self):
    return NamedSharding(self.mesh, P("data"))

  def to_global(self, batch: dict) -> dict:
    """This host's rows of a batch -> one global array sharded over all devices."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()}

  def device_batches(self, host_batches, ahead: int = 2):
    """Transfers batches ``ahead`` steps early (transfers are asynchronous), so the next
    batch is on the devices while the current step runs."""
    queue = collections.deque()
    for batch in host_batches:
      queue.append(self.to_global(batch))
      if len(queue) > ahead:
        yield queue.popleft()
    while queue:
      yield queue.popleft()

  def replicate(self, tree):
    """Host values (identical on every host) -> arrays replicated on all devices."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)

  def jit(self, fn, args: str = "rbr", donate_argnums=()):
    """``fn`` compiled for this placement: ``args`` says, argument by argument, replicated (r)
    or a batch (b); every output is replicated."""
    shard = {"r": self.replicated, "b": self.batch_sharding}
    return jax.jit(fn, in_shardings=tuple(shard[a] for a in args), out_shardings=self.replicated,
                   donate_argnums=donate_argnums)


def make_mesh():
  return Mesh(np.asarray(jax.devices()), ("data",))


# ----------------------------------------------------------------------------- evaluation

class Evaluation:
  """A model's metrics over one loader (training's validation, the final summary and every
  evaluator): one compiled step, a layer order per batch given as data."""

  def __init__(self, model, placement: Placement, loader: data_lib.Loader,
               position_reduction: str = "mean"):
    self.model, self.placement, self.loader = model, placement, loader
    self.step = placement.jit(make_eval_step(model, position_reduction))

  def __call__(self, params, orders, desc: Optional[str] = None) -> dict:
    """Loss/top-1/top-5 (and position accuracy for 'predict'). ``orders`` [k, n]: batch b of
    pass p runs order ``orders[(p * steps + b) % k]``; there are ceil(k / steps) passes, so
    k random orders give every batch a fresh order (one row: that order for every batch)."""
    orders = np.atleast_2d(np.asarray(orders))
    if orders.ndim != 2:
      raise ValueError(f"orders must be [k, n] (one order per row), got shape {orders.shape}")
    # Validated here, on the host: inside jit an out-of-range index would silently clamp.
    orders = np.stack([order_lib.check_order(o, self.model.depth) for o in orders])
    total, passes = self.sums(lambda batch, order: self.step(params, batch, order), orders, desc)
    out = self.metrics(total, passes)
    out["orders"] = int(min(len(orders), passes * self.loader.steps_per_epoch))
    if "position_hits" in total:
      n = max(float(total["count"]), 1.0)
      out["position_accuracy"] = float(total["position_hits"].sum() / (n * orders.shape[1]))
      out["position_accuracy_per_position"] = (total["position_hits"] / n).tolist()
      out["position_loss"] = float(total["position_ce"] / n)
    return out

  def sums(self, fn, per_batch, desc: Optional[str] = None):
    """``fn(batch, per_batch[i])`` summed over ceil(k / steps) passes of the loader, batch b of
    pass p given row (p * steps + b) % k of ``per_batch`` [k, ...]; returns (sums, passes)."""
    steps = self.loader.steps_per_epoch
    passes = -(-len(per_batch) // steps)
    bar = None
    if desc and jax.process_index() == 0:
      from tqdm import tqdm
      bar = tqdm(total=passes * steps, desc=desc, leave=False, unit="batch")
    total = None
    for p in range(passes):
      for b, batch in enumerate(self.loader.iterate(0)):
        row = self.placement.replicate(per_batch[(p * steps + b) % len(per_batch)])
        sums = fn(self.placement.to_global(batch), row)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        if bar:
          bar.update(1)
    if bar:
      bar.close()
    return {k: np.asarray(v, np.float64) for k, v in jax.device_get(total).items()}, passes

  @staticmethod
  def metrics(total: dict, passes: int) -> dict:
    n = max(float(total["count"]), 1.0)
    return {"loss": float(total["ce"] / n), "top1": float(total["top1"] / n),
            "top5": float(total["top5"] / n), "examples": int(round(n / passes))}


# ----------------------------------------------------------------------------- the set-up

@dataclasses.dataclass
class TrainSetup:
  """Everything a training run needs: model, data, optimizer, compiled steps."""
  config: Any
  model: model_lib.ViT
  placement: Placement
  train_loader: data_lib.Loader
  evaluation: Evaluation
  tx: Any
  train_step: Any  # compiled
  steps_per_epoch: int
  total_steps: int
  model_cfg: dict  # the model's fields, as saved in model.json


def build_setup(config, mesh: Optional[Mesh] = None) -> TrainSetup:
  placement = Placement(mesh or make_mesh())
  n_dev = placement.mesh.devices.size
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % n_dev:
      raise ValueError(f"{name}={config[name]} is not divisible by the {n_dev} devices; "
                       f"use a multiple of {n_dev}")
  d = config.data
  train_src = data_lib.get_source(d, d.train_split)
  eval_src = data_lib.get_source(d, d.eval_split)
  asked = config.model.num_classes
  if asked and asked != train_src.num_classes:
    raise ValueError(f"model.num_classes={asked} but the {d.name} training data has "
                     f"{train_src.num_classes} classes; set model.num_classes="
                     f"{train_src.num_classes} (or 0: take it from the data)")
  mcfg = model_config(config, train_src.num_classes)
  model = model_lib.build(mcfg)
  channels, size = model.channels, model.image_size
  pp = lambda augment: data_lib.Preprocess(d.preprocess, size, channels, augment,
                                           tuple(d.crop_scale), d.flip)
  common = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                num_threads=d.num_threads)
  train_loader = data_lib.Loader(train_src, pp(d.augment), config.batch_size,
                                 train=True, seed=config.seed, **common)
  eval_loader = data_lib.Loader(eval_src, pp(False), config.eval_batch_size, train=False, **common)
  steps_per_epoch = train_loader.steps_per_epoch
  total = steps_per_epoch * config.num_epochs
  tx, _ = make_optimizer(config, total)
  train_step = placement.jit(make_train_step(model, tx, config), "rb", donate_argnums=(0,))
  return TrainSetup(config, model, placement, train_loader,
                    Evaluation(model, placement, eval_loader, config.predict_loss_reduction),
                    tx, train_step, steps_per_epoch,
                    total, mcfg)


class _Writer:
  def __init__(self, workdir, enabled):
    self.enabled = enabled
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(workdir)
      except ImportError:
        pass

  def write(self, step, metrics: dict):
    if not self.enabled:
      return
    with open(self.jsonl, "a") as f:
      f.write(json.dumps({"step": int(step), **metrics}) + "\n")
    if self.tb:
      for k, v in metrics.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()

  def close(self):
    if self.tb:
      self.tb.close()


def _truncate_jsonl(path, last_step, log=print):
  """Keeps the records up to ``last_step``; a torn last line (what a crash mid-write
  leaves) is dropped, saying so; a damaged line elsewhere is an error."""
  if not os.path.exists(path):
    return
  lines = [l for l in open(path) if l.strip()]
  kept = []
  for i, line in enumerate(lines):
    try:
      record = json.loads(line)
    except ValueError:
      if i == len(lines) - 1:
        log(f"warning: {path}: dropped its unfinished last line (the run was stopped while "
            f"writing it)")
        continue
      raise ckpt_lib.CheckpointError(f"{path} line {i + 1} is not JSON: the file is damaged; "
                                     f"move it aside to resume (it is only the metrics log)")
    if record["step"] <= last_step:
      kept.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


def _fmt(m):
  return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log=print) -> dict:
  """Trains (resuming if ``workdir`` has a checkpoint), returns the final summary."""
  main = jax.process_index() == 0
  log = log if main else (lambda *a, **k: None)
  check_config(config)
  ensure_writable(workdir)
  setup = build_setup(config)
  model, placement, evaluation = setup.model, setup.placement, setup.evaluation
  mcfg = setup.model_cfg
  cfg_dict = json.loads(json.dumps(config.to_dict(), default=str))

  if check_workdir_identity(workdir, cfg_dict, mcfg) and main:
    ckpt_lib.write_json(os.path.join(workdir, "config.json"), cfg_dict)
    ckpt_lib.write_json(os.path.join(workdir, "model.json"),
                        {"model": mcfg, ckpt_lib.SEALED_KEY: ckpt_lib.SEAL_FORMAT})
  ckpt_lib.sync("lsvit_workdir")  # every process sees model.json before reading it
  ckpts = ckpt_lib.RunCheckpoints(workdir, config.keep_checkpoints, log)

  rep = placement.replicated

  def fresh_state():
    params = initial_params(config, model, log)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": setup.tx.init(params)}

  resume = ckpts.resume_point()
  partial = None  # the epoch's metric sums so far, when resuming mid-epoch
  if resume is not None:
    abstract = jax.eval_shape(lambda: {"step": jnp.zeros((), jnp.int32),
                                       "params": model_lib.param_shapes(model),
                                       "opt_state": setup.tx.init(model_lib.param_shapes(model))})
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                            abstract)
    state, meta = ckpts.restore_latest(resume, abstract)
    start_step = int(state["step"])
    partial = meta.get("partial")
    if main:  # drop metrics of epochs that were logged but not checkpointed before a crash
      _truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), start_step, log)
    log(f"resuming from {workdir}/checkpoints/{start_step} (epoch {meta.get('epoch')})")
  else:
    start_step = 0
    if main:  # records of a run stopped before its first checkpoint
      _truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), 0, log)
    state = placement.replicate(fresh_state())
  writer = _Writer(workdir, main)
  best = ckpts.best_meta()
  best_loss = (best.get("select_loss", best["val"]["loss"]) if best else math.inf)
  best_by = selection_order(config)
  spe = setup.steps_per_epoch
  log_every = max(1, config.log_every_steps)
  show_bar = main and config.progress

  try:
    for epoch in range(start_step // spe, config.num_epochs):
      first = max(start_step, epoch * spe)
      steps = range(first, (epoch + 1) * spe)
      bar = None
      if show_bar:
        from tqdm import tqdm
        bar = tqdm(total=spe,
                   initial=first - epoch * spe,
                   desc=f"epoch {epoch + 1}/{config.num_epochs}",
                   unit="step",
                   dynamic_ncols=True)
      acc_metrics, t0, seen = None, time.time(), 0
      done_before = 0  # steps of this epoch run before a mid-epoch resume
      if partial and first > epoch * spe and partial.get("step") == first:
        acc_metrics = placement.replicate({
            k: np.asarray(v, np.float32 if k != "nonfinite" else np.int32)
            for k, v in partial["sums"].items()
        })
        done_before = partial["steps"]
      partial = None
      batches = placement.device_batches(setup.train_loader.iterate(first, len(steps)))
      for step, batch in zip(steps, batches):
        state, m = setup.train_step(state, batch)
        acc_metrics = m if acc_metrics is None else jax.tree.map(jnp.add, acc_metrics, m)
        seen += 1
        if seen % log_every == 0 or step == steps[-1]:
          host = jax.device_get(acc_metrics)
          if host["nonfinite"]:
            last = ckpts.latest_step()
            kept = (f"the last good checkpoint (step {last}) is kept in {workdir}/checkpoints"
                    if last is not None else "no checkpoint had been saved yet")
            raise TrainingDiverged(
                f"the loss became NaN/inf in the steps up to step {step + 1} (epoch {epoch + 1}). "
                f"Training stopped; {kept}. Lower optimizer.lr, enable "
                f"optimizer.grad_clip_norm, or use compute_dtype=float32.")
          if bar:
            rate = seen * config.batch_size / max(time.time() - t0, 1e-9)
            n = seen + done_before
            bar.set_postfix(loss=f"{host['loss'] / n:.4f}", acc=f"{host['accuracy'] / n:.3f}",
                            img_s=f"{rate:.0f}")
        if bar:
          bar.update(1)
        if config.checkpoint_every_steps and (step + 1) % config.checkpoint_every_steps == 0 \
            and (step + 1) % spe:
          sums = {k: np.asarray(v).item() for k, v in jax.device_get(acc_metrics).items()}
          ckpts.save_latest(step + 1, state, {"epoch": epoch, "step": step + 1, "partial": {
              "step": step + 1, "steps": seen + done_before, "sums": sums}})
      if bar:
        bar.close()
      # The whole epoch's mean, also when it was resumed part-way.
      train_m = {k: float(v) / max(seen + done_before, 1)
                 for k, v in jax.device_get(acc_metrics).items() if k != "nonfinite"}
      elapsed = time.time() - t0
      val = evaluation(state["params"], np.arange(model.depth)[None])
      record = {"epoch": epoch + 1, "train": train_m, "val": val,
                "images_per_s": seen * config.batch_size / max(elapsed, 1e-9)}
      if best_by == "arbitrary":  # one pass, a fresh order per batch, new orders every epoch
        rng = np.random.default_rng([config.eval_seed, epoch + 1])
        record["val_arbitrary"] = evaluation(
            state["params"], order_lib.random_orders(rng, evaluation.loader.steps_per_epoch,
                                                     model.depth))
      record["select_loss"] = selection_loss(config, record)
      end_step = (epoch + 1) * spe
      writer.write(end_step, {**{f"train/{k}": v for k, v in train_m.items()},
                              **{f"val/{k}": v for k, v in val.items()},
                              **{f"val_arbitrary/{k}": v
                                 for k, v in record.get("val_arbitrary", {}).items()},
                              "epoch": epoch + 1, "images_per_s": record["images_per_s"]})
      log(f"epoch {epoch + 1}: train {_fmt(train_m)} | val {_fmt(val)}"
          + (f" | val arbitrary {_fmt(record['val_arbitrary'])}" if "val_arbitrary" in record
             else ""))
      if not math.isfinite(val["loss"]):
        raise TrainingDiverged(f"validation loss is {val['loss']} after epoch {epoch + 1}; "
                               f"not saving. Last good checkpoint: step {ckpts.latest_step()}.")
      if record["select_loss"] < best_loss:
        best_loss = record["select_loss"]
        ckpts.save_best(end_step, state["params"], record)
      if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == config.num_epochs:
        ckpts.save_latest(end_step, state, {"epoch": epoch + 1, "step": end_step, **record})
    ckpts.wait()
    summary = final_summary(setup, workdir, log)
  finally:
    ckpts.wait()
    ckpts.close()
    writer.close()
  return summary


def selection_order(config) -> str:
  """The layer order of the validation loss that picks the best checkpoint: 'arbitrary' (as the
  authors' Trainer, whose encoder shuffles in evaluation too) or 'sequential'; 'auto' is
  arbitrary for the shuffled variants."""
  if config.best_by == "auto":
    return "arbitrary" if config.variant in order_lib.SHUFFLED_VARIANTS else "sequential"
  return config.best_by


def selection_loss(config, record: dict) -> float:
  """The validation loss compared across epochs; in arbitrary order, for 'predict', the
  position loss is part of it (the authors' evaluation loss is their training loss)."""
  if selection_order(config) == "sequential":
    return record["val"]["loss"]
  val = record["val_arbitrary"]
  return val["loss"] + (config.predict_loss_weight * val["position_loss"]
                        if "position_loss" in val else 0.0)


def final_summary(setup: TrainSetup, workdir: str, log=print) -> dict:
  """Sequential and arbitrary-order top-1/top-5 of the best (lowest val CE) parameters."""
  rep = setup.placement.replicated
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                          model_lib.param_shapes(setup.model))
  params, meta = ckpt_lib.restore_best(workdir, abstract)
  config, depth, evaluation = setup.config, setup.model.depth, setup.evaluation
  rng = np.random.default_rng(config.eval_seed)
  orders = order_lib.random_orders(rng, config.eval_orders * evaluation.loader.steps_per_epoch,
                                   depth)
  seq = evaluation(params, np.arange(depth)[None], desc="eval sequential")
  arb = evaluation(params, orders, desc="eval arbitrary")
  summary = {"workdir": workdir, "best_epoch": meta.get("epoch"), "variant": config.variant,
             "sequential": seq, "arbitrary": arb}
  if jax.process_index() == 0:
    ckpt_lib.write_json(os.path.join(workdir, "summary.json"), summary)
  log(f"[{config.variant}] best epoch {meta.get('epoch')}: "
      f"sequential top-1 {seq['top1']:.2%} top-5 {seq['top5']:.2%} | "
      f"arbitrary order top-1 {arb['top1']:.2%} top-5 {arb['top5']:.2%}")
  return summary


def pretrain_config(config):
  """Stage 1: the same model trained sequentially (variant baseline), from scratch."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.variant = "baseline"
    c.num_epochs = config.pretrain_epochs
    c.optimizer.lr = config.pretrain_lr
    c.pretrain_epochs = 0
    c.init_from = ""
  return c


def train(config, workdir: str, log=print) -> dict:
  """What ``train.py`` does: optional multi-host start-up, the optional sequential stage 1
  (``pretrain_epochs``) into ``<workdir>/pretrain``, then training. Returns
  {'pretrain': summary, 'main': summary} (pretrain if configured)."""
  if config.distributed:
    # On SLURM/Open MPI/TPU pods every argument is auto-detected; elsewhere set them
    # (or JAX_COORDINATOR_ADDRESS) and start the same command on every host.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only hosts
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address or None,
        num_processes=config.num_processes or None,
        process_id=None if config.process_id < 0 else config.process_id)
  out = {}
  if config.pretrain_epochs and not config.init_from:
    pre_dir = os.path.join(workdir, "pretrain")
    log(f"== stage 1: sequential pretraining ({config.pretrain_epochs} epochs) in {pre_dir}")
    out["pretrain"] = train_and_evaluate(pretrain_config(config), pre_dir, log)
    if config.refine_from_pretrain:
      config = config.copy_and_resolve_references()
      with config.unlocked():
        config.init_from = pre_dir
    log(f"== stage 2: {config.variant} in {workdir}")
  out["main"] = train_and_evaluate(config, workdir, log)
  if "pretrain" in out and jax.process_index() == 0:
    for name, s in out.items():
      log(f"{name:>9} [{s['variant']}]: sequential top-1 {s['sequential']['top1']:.1%}, "
          f"arbitrary order top-1 {s['arbitrary']['top1']:.1%}")
  return out


def quiet_logs():
  """Orbax logs every save/restore at INFO through absl; keep the console to our progress."""
  import logging
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  for name in ("absl", "orbax", "jax._src.distributed"):
    logging.getLogger(name).setLevel(logging.ERROR)
