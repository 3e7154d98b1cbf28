"""Evaluators of trained runs, looked up by name: shuffled and pruned orders, merged models,
ensembles, position prediction, and the paper's representation analysis (Fig. 4).

Each evaluator is built from its own keyword arguments (``get('merge', merges=10)``), so an
option it does not take is an error. All of them measure with training's ``Evaluation`` (one
compiled step per model, the layer order per batch as data); a merged model is assembled by
indexing the runs' stacked parameters (``merge_params``), nothing rebuilt on the host.
"""
from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsvit import checkpoint as ckpt_lib
from lsvit import data as data_lib
from lsvit import model as model_lib
from lsvit import order as order_lib
from lsvit import train_lib


class EvalError(ValueError):
  pass


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass
class TrainedRun:
  workdir: str
  config: dict
  model_cfg: dict
  params: Any
  meta: dict
  device_params: Any = dataclasses.field(default=None, repr=False, compare=False)  # on the mesh

  @property
  def variant(self) -> str:
    return self.model_cfg["variant"]

  @property
  def depth(self) -> int:
    return self.model_cfg["depth"]

  @property
  def setting(self) -> str:
    """A label grouping runs that differ only in their seed."""
    label = self.variant
    if self.variant == "layerdrop":
      label += f" p={self.config['layerdrop']}"
    if self.config["keep_layers"]:
      label += f" keep {self.config['keep_layers']}"
    c = self.model_cfg
    arch = f"{'DeiT' if c['distilled'] else 'ViT'} L{c['depth']} D{c['width']} P{c['patch_size']}"
    return f"{label} ({arch})"


def expand_workdirs(patterns: Sequence[str]) -> List[str]:
  out = []
  for p in patterns:
    hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    if not hits:
      raise EvalError(f"no workdir matches {p!r}")
    out += hits
  return out


def load_runs(workdirs: Sequence[str]) -> List[TrainedRun]:
  runs = []
  for wd in expand_workdirs(workdirs):
    if not os.path.isdir(wd):
      raise EvalError(f"workdir {wd} does not exist")
    for name in ("config.json", "model.json"):
      if not os.path.exists(os.path.join(wd, name)):
        raise EvalError(
            f"{wd} is not a training workdir (no {name}); pass directories made by train.py")
    params, meta = ckpt_lib.restore_best(wd)
    runs.append(TrainedRun(wd, json.load(open(os.path.join(wd, "config.json"))),
                           ckpt_lib.load_model_cfg(wd), params, meta))
  return runs


def _data_key(run: TrainedRun):
  d = run.config["data"]
  return (d["name"], d.get("dir"), d["eval_split"], d["preprocess"], run.model_cfg["image_size"],
          run.model_cfg["channels"])


# ---------------------------------------------------------------------- what evaluators share

class Context:
  """The eval split, the placement and one ``Evaluation`` per distinct model, shared by all
  runs and evaluators (so a model is compiled once, whatever the number of runs)."""

  def __init__(self, runs: Sequence[TrainedRun], batch_size: Optional[int] = None, seed: int = 0,
               progress: bool = True):
    if not runs:
      raise EvalError("no runs to evaluate")
    keys = {_data_key(r) for r in runs}
    if len(keys) > 1:
      raise EvalError(
          f"runs were trained on different data/preprocessing: {sorted(map(str, keys))}")
    first = runs[0]
    from ml_collections import ConfigDict
    d = ConfigDict(first.config["data"])
    self.placement = train_lib.Placement(train_lib.make_mesh())
    bs = batch_size or first.config["eval_batch_size"]
    n_dev = self.placement.mesh.devices.size
    if bs % n_dev:
      raise EvalError(f"eval batch {bs} is not divisible by the {n_dev} devices")
    source = data_lib.get_source(d, d.eval_split)
    pp = data_lib.Preprocess(d.preprocess, first.model_cfg["image_size"],
                             first.model_cfg["channels"])
    self.loader = data_lib.Loader(source, pp, bs, train=False, process_index=jax.process_index(),
                                  process_count=jax.process_count(), num_threads=d.num_threads)
    self.seed, self.progress = seed, progress
    self._evaluations: Dict[str, train_lib.Evaluation] = {}

  def evaluation_for(self, model_cfg: dict) -> train_lib.Evaluation:
    key = json.dumps(model_cfg, sort_keys=True, default=str)
    if key not in self._evaluations:
      self._evaluations[key] = train_lib.Evaluation(model_lib.build(model_cfg), self.placement,
                                                    self.loader)
    return self._evaluations[key]

  def rng(self, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([self.seed, salt])

  def evaluate(self, run: TrainedRun, orders, desc=None, params=None) -> dict:
    p = params if params is not None else self.device_params(run)
    return self.evaluation_for(run.model_cfg)(p, orders, desc if self.progress else None)

  def device_params(self, run: TrainedRun):
    if run.device_params is None:
      run.device_params = self.placement.replicate(jax.tree.map(np.asarray, run.params))
    return run.device_params

  def arbitrary_orders(self, depth: int, passes: int, salt: int = 1) -> np.ndarray:
    """A fresh random order for every batch of ``passes`` passes (same for every run)."""
    return order_lib.random_orders(self.rng(salt), passes * self.loader.steps_per_epoch, depth)

  def compilations(self) -> int:
    return sum(e.step._cache_size() for e in self._evaluations.values())


# ---------------------------------------------------------- where a merged model is assembled

def stack_params(trees: Sequence[Any]):
  """Parameter trees (one per run) stacked on a new leading run axis [M, ...]."""
  return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees)


@jax.jit
def merge_params(stacked, sources, base):
  """A merged model from runs stacked on axis 0: encoder slot l is layer l of run
  ``sources[l]``; everything outside the encoder blocks (patch embedding, tokens,
  position embedding, shared position table, final norm, heads) comes from run ``base``."""
  blocks = stacked["Transformer"]["encoderblock"]
  slots = jnp.arange(sources.shape[0])
  merged = jax.tree.map(lambda a: a[base], stacked)
  merged["Transformer"]["encoderblock"] = jax.tree.map(lambda a: a[sources, slots], blocks)
  return merged


def merge_sources(rng, num_runs: int, depth: int, count: int, allow_repeats: bool) -> np.ndarray:
  if num_runs < depth and not allow_repeats:
    raise EvalError(f"merging needs at least {depth} runs (one per layer, no two layers from the "
                    f"same run), got {num_runs}; train more runs or pass --allow_repeats")
  return np.stack([rng.choice(num_runs, depth, replace=num_runs < depth)
                   for _ in range(count)]).astype(np.int32)


# ----------------------------------------------------------------------------- helpers

def summarize(values: Sequence[float]) -> dict:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def _group(runs):
  """Runs that differ only in seed (same setting label and model)."""
  groups: Dict[str, List[TrainedRun]] = {}
  for r in runs:
    key = r.setting + json.dumps(r.model_cfg, sort_keys=True, default=str)
    groups.setdefault(key, []).append(r)
  return groups


def _per_run(runs, fn, mode):
  per_run = []
  for r in runs:
    res = fn(r)
    per_run.append({"workdir": r.workdir, "setting": r.setting, **res})
  settings = {}
  for group in _group(runs).values():
    name = group[0].setting
    rows = [p for p, r in zip(per_run, runs) if r in group]
    settings[name] = {k: {"top1": summarize([row[k]["top1"] for row in rows]),
                          "top5": summarize([row[k]["top5"] for row in rows])}
                      for k in rows[0] if isinstance(rows[0][k], dict) and "top1" in rows[0][k]}
  return {"mode": mode, "runs": per_run, "settings": settings}


def _check_same(runs, what):
  cfgs = {json.dumps(r.model_cfg, sort_keys=True, default=str) for r in runs}
  if len(cfgs) > 1:
    diffs = sorted({f"{k}={r.model_cfg.get(k)!r}" for r in runs for k in r.model_cfg
                    if any(r.model_cfg.get(k) != o.model_cfg.get(k) for o in runs)})
    raise EvalError(f"{what} needs runs of one architecture and variant; these differ in: "
                    + ", ".join(diffs))


def _order_policy(ctx, run, passes, index: int = 0):
  """Baselines run in their original order, LayerShuffle runs in arbitrary order
  (``index`` > 0: another stream of random orders, e.g. for an ensemble's members)."""
  if run.variant in order_lib.SHUFFLED_VARIANTS:
    return ctx.arbitrary_orders(run.depth, passes, salt=1 + 1000 * index), "arbitrary"
  return np.tile(np.arange(run.depth), (passes * ctx.loader.steps_per_epoch, 1)), "sequential"


def _pm(s) -> str:
  if s["n"] > 1:
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
  return f"{100 * s['mean']:.2f}"


def _positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise EvalError(f"{name}={value!r}: must be a whole number >= 1")
  return int(value)


def _name(run: TrainedRun) -> str:
  return os.path.basename(run.workdir)


# ----------------------------------------------------------------------------- evaluators

class Evaluator:
  """``__call__(ctx, runs, out) -> result`` (JSON-able, ``result['mode']`` is the name);
  ``markdown(result)`` the table shaped like the paper's."""
  name = ""

  def groups(self, runs) -> List[list]:
    """For ``--mode all``: the run groups this evaluator applies to (each gets one result)."""
    return [list(runs)]

  @classmethod
  def options(cls) -> List[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


class Sequential(Evaluator):
  """Every run in its original layer order (Table 1)."""
  name = "sequential"

  def __call__(self, ctx, runs, out=None):
    return _per_run(runs, lambda r: {"sequential": ctx.evaluate(
        r, np.arange(r.depth)[None], f"{_name(r)} sequential")}, "sequential")

  markdown = staticmethod(lambda res: _order_table(res))


class Arbitrary(Evaluator):
  """A fresh random order for every batch, over ``orders`` passes of the eval split (Table 1)."""
  name = "arbitrary"

  def __init__(self, orders: int = 5):
    self.orders = _positive("orders", orders)

  def __call__(self, ctx, runs, out=None):
    return _per_run(runs, lambda r: {"arbitrary": ctx.evaluate(
        r, ctx.arbitrary_orders(r.depth, self.orders), f"{_name(r)} arbitrary")}, "arbitrary")

  markdown = staticmethod(lambda res: _order_table(res))


def _order_table(res: dict) -> str:
  m = res["mode"]
  rows = ["| setting | runs | top-1 (%) | top-5 (%) |", "|---|---|---|---|"]
  for name, s in sorted(res["settings"].items()):
    rows.append(f"| {name} | {s[m]['top1']['n']} | {_pm(s[m]['top1'])} | {_pm(s[m]['top5'])} |")
  return f"**{m} order** (mean ± std over runs)\n\n" + "\n".join(rows)


class Prune(Evaluator):
  """Accuracy with k layers kept, in original and in random order (Fig. 1b/1c). Reduced-depth
  runs (refined with keep_layers) are evaluated at their own depth only."""
  name = "prune"
  METHODS = ("random", "even", "first")

  def __init__(self, ks: Sequence[int] = (3, 6, 9, 12), method: str = "random", draws: int = 5):
    self.ks = sorted({_positive("k", k) for k in ks})
    if method not in self.METHODS:
      raise EvalError(f"prune method {method!r}: choose one of {', '.join(self.METHODS)}")
    self.method, self.draws = method, _positive("draws", draws)

  def __call__(self, ctx, runs, out=None):
    max_depth = max(r.depth for r in runs)
    if any(k > max_depth for k in self.ks):
      raise EvalError(f"cannot keep k={[k for k in self.ks if k > max_depth]} layers: "
                      f"the runs have at most {max_depth} layers (choose 1 <= k <= {max_depth})")

    def one(r):
      res = {}
      own = [r.depth] if r.config["keep_layers"] else [k for k in self.ks if k <= r.depth]
      for k in own:
        n = self.draws * ctx.loader.steps_per_epoch
        seq = order_lib.prune_orders(ctx.rng(100 + k), n, r.depth, k, self.method, shuffle=False)
        arb = order_lib.prune_orders(ctx.rng(100 + k), n, r.depth, k, self.method, shuffle=True)
        res[f"k{k}_sequential"] = ctx.evaluate(r, seq, f"{_name(r)} keep {k} sequential")
        res[f"k{k}_arbitrary"] = ctx.evaluate(r, arb, f"{_name(r)} keep {k} arbitrary")
      return res

    res = _per_run(runs, one, "prune")
    res.update(ks=self.ks, method=self.method, draws=self.draws)
    if out:
      from lsvit import plots
      res["figures"] = [plots.prune_plot(res, os.path.join(out, "prune.png"))]
    return res

  @staticmethod
  def markdown(res):
    head = "| setting | " + " | ".join(f"k={k} seq | k={k} arb" for k in res["ks"]) + " |"
    rows = [head, "|---|" + "---|---|" * len(res["ks"])]
    for name, s in sorted(res["settings"].items()):
      cells = []
      for k in res["ks"]:
        for kind in ("sequential", "arbitrary"):
          key = f"k{k}_{kind}"
          cells.append(_pm(s[key]["top1"]) if key in s else "–")
      rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return (f"**pruning**, top-1 (%) with k layers kept ({res['method']} subsets, "
            f"{res['draws']} draws per batch position)\n\n" + "\n".join(rows))


class Merge(Evaluator):
  """``merges`` "Frankenstein" models from runs of one setting: slot l from a different run for
  every l; embedding, tokens and head from run ``base`` ('random': a random run per model);
  baselines run in their original order, LayerShuffle runs in arbitrary order (Table 2)."""
  name = "merge"

  def __init__(self, merges: int = 100, base: str = "random", allow_repeats: bool = False,
               orders: int = 1):
    self.merges = _positive("merges", merges)
    if str(base) != "random" and not str(base).isdigit():
      raise EvalError(f"merge base {base!r}: give a run index (0, 1, ...) or 'random'")
    self.base, self.allow_repeats = str(base), bool(allow_repeats)
    self.orders = _positive("orders", orders)

  def groups(self, runs):
    return [g for g in _group(runs).values() if len(g) >= g[0].depth]

  def __call__(self, ctx, runs, out=None):
    _check_same(runs, "merging")
    compiled_before = ctx.compilations() + merge_params._cache_size()
    depth = runs[0].depth
    rng = ctx.rng(7)
    sources = merge_sources(rng, len(runs), depth, self.merges, self.allow_repeats)
    if self.base == "random":
      bases = rng.integers(0, len(runs), self.merges)
    else:
      if not 0 <= int(self.base) < len(runs):
        raise EvalError(f"--merge_base {self.base} is not a run index in [0, {len(runs)})")
      bases = np.full(self.merges, int(self.base))
    stacked = ctx.placement.replicate(stack_params([r.params for r in runs]))
    order, order_name = _order_policy(ctx, runs[0], self.orders)
    originals = [ctx.evaluate(r, order, None) for r in runs]
    results = []
    it = range(self.merges)
    if ctx.progress:
      from tqdm import tqdm
      it = tqdm(it, desc="merged models", unit="model")
    for i in it:
      params = merge_params(stacked, jnp.asarray(sources[i]), jnp.asarray(bases[i]))
      results.append(ctx.evaluate(runs[0], order, params=params))
    return {"mode": "merge", "setting": runs[0].setting, "order": order_name, "runs": len(runs),
            "merged": {"top1": summarize([m["top1"] for m in results]),
                       "top5": summarize([m["top5"] for m in results])},
            "originals": {"top1": summarize([m["top1"] for m in originals]),
                          "top5": summarize([m["top5"] for m in originals])},
            "models": [{"sources": s.tolist(), "base": int(b), **m}
                       for s, b, m in zip(sources, bases, results)],
            # programs compiled while evaluating the originals and all merged models
            "compilations": ctx.compilations() + merge_params._cache_size() - compiled_before}

  @staticmethod
  def markdown(res):
    return "\n".join([
        f"**merged models** ({len(res['models'])} merged from {res['runs']} runs; "
        f"no two layers from one run)",
        "", "| model | top-1 (%) | top-5 (%) | layer order |", "|---|---|---|---|",
        f"| {res['setting']} (the runs) | {_pm(res['originals']['top1'])} | "
        f"{_pm(res['originals']['top5'])} | {res['order']} |",
        f"| {res['setting']} merged | {_pm(res['merged']['top1'])} | "
        f"{_pm(res['merged']['top5'])} | {res['order']} |"])


class Ensemble(Evaluator):
  """The mean of the runs' logits, each run in its own random order for every batch."""
  name = "ensemble"

  def __init__(self, orders: int = 1):
    self.orders = _positive("orders", orders)

  def groups(self, runs):
    return [g for g in _group(runs).values() if len(g) > 1]

  def __call__(self, ctx, runs, out=None):
    _check_same(runs, "an ensemble")
    evaluation = ctx.evaluation_for(runs[0].model_cfg)
    model = evaluation.model
    stacked = ctx.placement.replicate(stack_params([r.params for r in runs]))

    def ensemble_step(stacked, batch, orders):
      logits = jax.lax.map(
          lambda po: model.apply({"params": po[0]}, batch["image"], po[1])["logits"],
          (stacked, orders)).mean(0)
      return train_lib.classification_sums(logits, batch["label"], batch["mask"])

    step = ctx.placement.jit(ensemble_step)
    # Run m sees, batch for batch, the orders its single-run evaluation sees.
    per_run = [_order_policy(ctx, r, self.orders, m)[0] for m, r in enumerate(runs)]
    total, passes = evaluation.sums(lambda batch, o: step(stacked, batch, o),
                                    np.stack(per_run, axis=1))
    m = evaluation.metrics(total, passes)
    single = [ctx.evaluate(r, orders) for r, orders in zip(runs, per_run)]
    return {"mode": "ensemble", "setting": runs[0].setting, "runs": len(runs),
            "ensemble": {"top1": m["top1"], "top5": m["top5"], "loss": m["loss"]},
            "single": {"top1": summarize([s["top1"] for s in single]),
                       "top5": summarize([s["top5"] for s in single])}}

  @staticmethod
  def markdown(res):
    e = res["ensemble"]
    return "\n".join([
        f"**ensemble** of {res['runs']} runs (mean of logits)", "",
        "| model | top-1 (%) | top-5 (%) |", "|---|---|---|",
        f"| {res['setting']} single runs | {_pm(res['single']['top1'])} | "
        f"{_pm(res['single']['top5'])} |",
        f"| {res['setting']} ensemble | {100 * e['top1']:.2f} | {100 * e['top5']:.2f} |"])


class Position(Evaluator):
  """For ``predict`` runs: how often each layer predicts the position it runs at, in arbitrary
  order over ``orders`` passes."""
  name = "position"

  def __init__(self, orders: int = 5):
    self.orders = _positive("orders", orders)

  def groups(self, runs):
    return [list(runs)] if any(r.variant == "predict" for r in runs) else []

  def __call__(self, ctx, runs, out=None):
    predict = [r for r in runs if r.variant == "predict"]
    if not predict:
      raise EvalError("position mode needs LayerShuffle-predict runs (variant=predict)")
    per_run = []
    for r in predict:
      m = ctx.evaluate(r, ctx.arbitrary_orders(r.depth, self.orders), f"{_name(r)} position")
      per_run.append({"workdir": r.workdir, "position_accuracy": m["position_accuracy"],
                      "per_position": m["position_accuracy_per_position"], "top1": m["top1"]})
    return {"mode": "position", "runs": per_run,
            "position_accuracy": summarize([p["position_accuracy"] for p in per_run]),
            "per_position": np.mean([p["per_position"] for p in per_run], 0).tolist()}

  @staticmethod
  def markdown(res):
    per = " | ".join(f"{100 * a:.2f}" for a in res["per_position"])
    n = len(res["per_position"])
    return "\n".join([
        f"**position prediction** accuracy: {_pm(res['position_accuracy'])} % over "
        f"{res['position_accuracy']['n']} run(s)", "",
        "| position | " + " | ".join(str(p) for p in range(n)) + " |", "|---|" + "---|" * n,
        f"| accuracy (%) | {per} |"])


def analysis_data(ctx, run: TrainedRun, layer: int, images: int, chunk: int = 50):
  """For ``images`` validation images, one random order each: the chosen layer's whole
  output (all tokens) and position, and the L2 norm of every layer's additive
  contribution to the class token, ||cls_out - cls_in||, at the position it ran."""
  model, depth = ctx.evaluation_for(run.model_cfg).model, run.depth
  if not 0 <= layer < depth:
    raise EvalError(f"--layer {layer} is not a layer of this {depth}-layer model")

  def one(params, image, order):
    out = model.apply({"params": params}, image[None], order, capture=True)
    hidden = out["hidden"][:, 0]  # [n, T, D]
    inputs = jnp.concatenate([out["embedded"], hidden[:-1]], 0)
    cls_in, cls_out = inputs[:, 0], hidden[:, 0]
    contrib = jnp.linalg.norm(cls_out - cls_in, axis=-1)
    pos = jnp.argmax(order == layer)
    return hidden[pos].reshape(-1), pos, contrib

  fn = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
  params = jax.tree.map(jnp.asarray, run.params)
  rng = ctx.rng(13)
  src = ctx.loader.source
  # More passes than validation images: images repeat, each time in a fresh order.
  pick = rng.choice(len(src), images, replace=images > len(src))
  orders = order_lib.random_orders(rng, len(pick), depth)
  feats, positions, contribs = [], [], []
  for i in range(0, len(pick), chunk):
    x = np.stack([ctx.loader.preprocess(src[j][0]) for j in pick[i:i + chunk]])
    f, p, c = jax.device_get(fn(params, jnp.asarray(x), jnp.asarray(orders[i:i + chunk])))
    feats.append(f), positions.append(p), contribs.append(c)
  contribs = np.concatenate(contribs)  # [N, n] by position
  # table[layer, position] -> list of contributions
  by_layer = np.zeros((depth, depth), object)
  for l in range(depth):
    for p in range(depth):
      by_layer[l, p] = []
  for o, c in zip(orders, contribs):
    for p, l in enumerate(o):
      by_layer[l, p].append(float(c[p]))
  return np.concatenate(feats), np.concatenate(positions), by_layer


def contribution_distance_spearman(by_layer) -> float:
  """Spearman rho between |position - original position| and the layer's contribution
  (normalised by the layer's largest): negative when layers withhold their output away
  from home, as the paper finds for LayerShuffle (Fig. 4d)."""
  from scipy.stats import spearmanr
  dist, val = [], []
  for l, row in enumerate(by_layer):
    for p, c in enumerate(per_layer_normalised(row)):
      dist += [abs(p - l)] * len(c)
      val += c.tolist()
  return float(spearmanr(dist, val).statistic)


def position_knn_accuracy(embedding, positions, seed: int = 0) -> float:
  """How well the position a layer ran at can be read off the 2-D UMAP picture
  (10-nearest-neighbours, 5-fold cross-validation); chance is 1/depth."""
  from sklearn.model_selection import StratifiedKFold, KFold, cross_val_score
  from sklearn.neighbors import KNeighborsClassifier
  counts = np.bincount(positions)
  folds = (StratifiedKFold(5, shuffle=True, random_state=seed) if counts[counts > 0].min() >= 5
           else KFold(5, shuffle=True, random_state=seed))
  return float(cross_val_score(KNeighborsClassifier(10), embedding, positions, cv=folds).mean())


def per_layer_normalised(row):
  """One layer's contributions by position, each divided by the layer's largest (so layers
  of different scales compare); shared by the Fig. 4d plot and its Spearman statistic."""
  top = max((max(c) for c in row if c), default=1.0) or 1.0
  return [np.asarray(c, dtype=float) / top for c in row]


class Analysis(Evaluator):
  """Fig. 4 for each run: UMAP of layer ``layer``'s whole output over ``images`` images, each in
  a fresh random order, coloured by the position it ran at; every layer's class-token
  contribution by position (ridge plots); and two numbers that summarise them."""
  name = "analysis"

  def __init__(self, layer: int = 0, images: int = 1000):
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
      raise EvalError(f"layer={layer!r}: must be a layer index")
    self.layer, self.images = int(layer), _positive("images", images)

  def __call__(self, ctx, runs, out=None):
    from lsvit import plots
    results = []
    for r in runs:
      feats, positions, by_layer = analysis_data(ctx, r, self.layer, self.images)
      emb = plots.umap_2d(feats, seed=ctx.seed)
      name = os.path.basename(os.path.normpath(r.workdir))
      results.append({"workdir": r.workdir, "setting": r.setting, "embedding": emb,
                      "positions": positions, "contributions": by_layer, "name": name,
                      "normalised": [per_layer_normalised(row) for row in by_layer]})
    files = []
    if out:
      files.append(plots.umap_panels(results, self.layer, os.path.join(out, "analysis_umap.png")))
      files.append(plots.ridge_panels(results, os.path.join(out, "analysis_contributions.png")))
    return {"mode": "analysis", "layer": self.layer, "images": self.images,
            "distinct_images": int(min(self.images, len(ctx.loader.source))),
            "runs": [{"workdir": x["workdir"], "setting": x["setting"],
                      "contribution_distance_spearman":
                          contribution_distance_spearman(x["contributions"]),
                      "position_knn_accuracy":
                          position_knn_accuracy(x["embedding"], x["positions"], ctx.seed),
                      "mean_contribution": [[float(np.mean(c)) if c else None for c in row]
                                            for row in x["contributions"]],
                      "positions_seen": np.bincount(
                          x["positions"], minlength=len(x["contributions"])).tolist()}
                     for x in results],
            "figures": files}

  @staticmethod
  def markdown(res):
    return (f"**analysis** of layer {res['layer']} over {res['images']} images: "
            + ", ".join(os.path.basename(f) for f in res["figures"]))


EVALUATORS = {e.name: e for e in (Sequential, Arbitrary, Prune, Merge, Ensemble, Position,
                                  Analysis)}
MODES = tuple(EVALUATORS) + ("all",)


def get(name: str, **options) -> Evaluator:
  """The evaluator ``name`` built from ``options``; a name or option it does not know is an
  error that lists what it takes."""
  if name not in EVALUATORS:
    raise EvalError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}")
  cls = EVALUATORS[name]
  unknown = sorted(set(options) - set(cls.options()))
  if unknown:
    raise EvalError(f"mode {name} takes no option {', '.join(unknown)}; it takes: "
                    f"{', '.join(cls.options()) or 'none'}")
  return cls(**options)


def markdown(res: dict) -> str:
  return EVALUATORS[res["mode"]].markdown(res)


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def _write_out(out: str):
  if os.path.exists(out) and not os.path.isdir(out):
    raise EvalError(f"--out {out} is an existing file, not a directory; choose another --out")
  try:
    os.makedirs(out, exist_ok=True)
    probe = os.path.join(out, f".write_test_{os.getpid()}")
    open(probe, "w").close()
    os.remove(probe)
  except OSError as e:
    raise EvalError(f"cannot write results to {out} ({e.strerror or e}); choose a writable "
                    f"--out") from None


def applicable(runs, options: Optional[dict] = None) -> Dict[str, dict]:
  """``--mode all``: every evaluator with a group of runs it applies to, each given the
  ``options`` it takes; an option no applicable evaluator takes is an error."""
  options = dict(options or {})
  modes = {name: {k: v for k, v in options.items() if k in cls.options()}
           for name, cls in EVALUATORS.items() if cls(**{}).groups(runs)}
  unused = sorted(set(options) - {k for kw in modes.values() for k in kw})
  if unused:
    raise EvalError(f"option {', '.join(unused)} is taken by none of the modes that apply to "
                    f"these runs ({', '.join(modes)})")
  return modes


def run(workdirs, modes, out: Optional[str] = None, batch_size: Optional[int] = None,
        seed: int = 0, progress: bool = True, log=print) -> Dict[str, Any]:
  """Evaluates the runs in ``workdirs`` (globs allowed); ``modes``: a name, a list of names or
  {name: options}, sharing one checkpoint load and compilation; 'all' is every mode that applies
  (``{'all': options}`` shares the options out). Writes ``<out>/<mode>.json``, ``<mode>.md``,
  figures, and ``<out>/tables.md`` (every mode's table)."""
  if isinstance(modes, str):
    modes = [modes]
  if not isinstance(modes, dict):
    modes = {m: {} for m in modes}
  every = "all" in modes
  if every and len(modes) > 1:
    raise EvalError("mode 'all' already includes every mode; give it alone")
  evaluators = {m: get(m, **o) for m, o in modes.items() if m != "all"}  # options checked first
  runs = load_runs(workdirs)
  if every:
    evaluators = {m: get(m, **o) for m, o in applicable(runs, modes["all"]).items()}
  out = out or os.path.join(runs[0].workdir, "eval")
  _write_out(out)
  ctx = Context(runs, batch_size, seed, progress)
  results: Dict[str, Any] = {}
  tables = []
  for m, evaluator in evaluators.items():
    res = [evaluator(ctx, g, out) for g in (evaluator.groups(runs) if every else [runs])]
    results[m] = res if len(res) > 1 else res[0]
    md = "\n\n".join(evaluator.markdown(r) for r in res)
    tables.append(md)
    with open(os.path.join(out, f"{m}.json"), "w") as f:
      json.dump(_jsonable(results[m]), f, indent=1)
    with open(os.path.join(out, f"{m}.md"), "w") as f:
      f.write(md + "\n")
  with open(os.path.join(out, "tables.md"), "w") as f:
    f.write("\n\n".join(tables) + "\n")
  log("\n\n".join(tables))
  log(f"\nwrote {out}/: " + ", ".join(sorted(os.listdir(out))))
  return results
