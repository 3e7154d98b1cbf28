"""Evaluation of trained runs: shuffled and pruned orders, merged models, ensembles,
position prediction, and the paper's representation analysis (Fig. 4).

Orders and merges are data: every evaluation goes through one jitted eval step per
order length, and a merged model is assembled by indexing the runs' stacked
parameters (``merge_params``) -- nothing is rebuilt or copied on the host.
"""
from __future__ import annotations

import dataclasses
import glob
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

MODES = ("sequential", "arbitrary", "prune", "merge", "ensemble", "position", "analysis", "all")
SHUFFLED = order_lib.SHUFFLED_VARIANTS


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
      label += f" p={self.config.get('layerdrop', 0.2)}"
    if self.config.get("keep_layers"):
      label += f" keep {self.config['keep_layers']}"
    c = self.model_cfg
    arch = f"{'DeiT' if c.get('distilled') else 'ViT'} L{c['depth']} D{c['width']} P{c['patch_size']}"
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
        raise EvalError(f"{wd} is not a training workdir (no {name}); pass directories made by train.py")
    params, meta = ckpt_lib.restore_best(wd)
    runs.append(TrainedRun(wd, json.load(open(os.path.join(wd, "config.json"))),
                           ckpt_lib.load_model_cfg(wd), params, meta))
  return runs


def _data_key(run: TrainedRun):
  d = run.config["data"]
  return (d["name"], d.get("dir"), d["eval_split"], d["preprocess"], run.model_cfg["image_size"],
          run.model_cfg["channels"])


# ----------------------------------------------------------------------------- the evaluator

class Evaluator:
  """The eval split, the mesh and the compiled eval steps shared by all runs."""

  def __init__(self, runs: Sequence[TrainedRun], batch_size: Optional[int] = None, seed: int = 0,
               progress: bool = True):
    if not runs:
      raise EvalError("no runs to evaluate")
    keys = {_data_key(r) for r in runs}
    if len(keys) > 1:
      raise EvalError(f"runs were trained on different data/preprocessing: {sorted(map(str, keys))}")
    first = runs[0]
    from ml_collections import ConfigDict
    d = ConfigDict(first.config["data"])
    mesh = train_lib.make_mesh()
    bs = batch_size or first.config["eval_batch_size"]
    if bs % mesh.devices.size:
      raise EvalError(f"eval batch {bs} is not divisible by the {mesh.devices.size} devices")
    source = data_lib.get_source(d, d.eval_split)
    pp = data_lib.Preprocess(d.preprocess, first.model_cfg["image_size"], first.model_cfg["channels"])
    loader = data_lib.Loader(source, pp, bs, train=False, process_index=jax.process_index(),
                             process_count=jax.process_count(), num_threads=d.get("num_threads", 8))
    self.seed, self.progress = seed, progress
    self._runs: Dict[str, train_lib.Run] = {}
    self._template = (first.config, mesh, loader)
    self.loader, self.mesh = loader, mesh

  def run_for(self, model_cfg: dict) -> train_lib.Run:
    """A Run (eval parts only) per distinct model; its jitted step is reused by all runs."""
    key = json.dumps(model_cfg, sort_keys=True, default=str)
    if key not in self._runs:
      config, mesh, loader = self._template
      model = model_lib.build(model_cfg)
      r = train_lib.Run(config, model, mesh, None, loader, None, None,
                        train_lib.make_eval_step(model), 0, 0, model_cfg)
      r.eval_fn = train_lib.jit_eval(r)  # one compiled program per model, shared by its runs
      self._runs[key] = r
    return self._runs[key]

  def rng(self, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([self.seed, salt])

  def evaluate(self, run: TrainedRun, orders, desc=None, params=None) -> dict:
    r = self.run_for(run.model_cfg)
    p = params if params is not None else self.device_params(run)
    return train_lib.evaluate(r, p, orders, r.eval_fn, desc if self.progress else None)

  def device_params(self, run: TrainedRun):
    r = self.run_for(run.model_cfg)
    if run.device_params is None:
      run.device_params = r.replicate(jax.tree.map(np.asarray, run.params))
    return run.device_params

  def arbitrary_orders(self, depth: int, passes: int, salt: int = 1) -> np.ndarray:
    """A fresh random order for every batch of ``passes`` passes (same for every run)."""
    return order_lib.random_orders(self.rng(salt), passes * self.loader.steps_per_epoch, depth)

  def compilations(self) -> int:
    return sum(r.eval_fn._cache_size() for r in self._runs.values())


# ----------------------------------------------------------------------------- where a merged model is assembled

def stack_runs(runs: Sequence[TrainedRun]):
  """The runs' parameter trees stacked on a new leading run axis [M, ...]."""
  return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *[r.params for r in runs])


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


# ----------------------------------------------------------------------------- modes

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


def _per_run(ev, runs, fn, mode):
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


def mode_sequential(ev, runs, **_):
  return _per_run(ev, runs, lambda r: {"sequential": ev.evaluate(
      r, np.arange(r.depth)[None], f"{os.path.basename(r.workdir)} sequential")}, "sequential")


def mode_arbitrary(ev, runs, orders: int = 5, **_):
  return _per_run(ev, runs, lambda r: {"arbitrary": ev.evaluate(
      r, ev.arbitrary_orders(r.depth, orders), f"{os.path.basename(r.workdir)} arbitrary")},
                  "arbitrary")


def mode_prune(ev, runs, ks=(3, 6, 9, 12), method: str = "random", draws: int = 5, **_):
  """Accuracy with k layers kept, in original and in random order. Reduced-depth runs
  (refined with keep_layers) are evaluated at their own depth only."""
  max_depth = max(r.depth for r in runs)
  ks = sorted(set(int(k) for k in ks))
  if any(k > max_depth or k < 1 for k in ks):
    raise EvalError(f"cannot keep k={[k for k in ks if k > max_depth or k < 1]} layers: "
                    f"the runs have at most {max_depth} layers (choose 1 <= k <= {max_depth})")

  def one(r):
    out = {}
    own = [r.depth] if r.config.get("keep_layers") else [k for k in ks if k <= r.depth]
    for k in own:
      salt = 100 + k
      n = draws * ev.loader.steps_per_epoch
      seq = order_lib.prune_orders(ev.rng(salt), n, r.depth, k, method, shuffle=False)
      arb = order_lib.prune_orders(ev.rng(salt), n, r.depth, k, method, shuffle=True)
      name = os.path.basename(r.workdir)
      out[f"k{k}_sequential"] = ev.evaluate(r, seq, f"{name} keep {k} sequential")
      out[f"k{k}_arbitrary"] = ev.evaluate(r, arb, f"{name} keep {k} arbitrary")
    return out

  res = _per_run(ev, runs, one, "prune")
  res.update(ks=ks, method=method, draws=draws)
  return res


def _check_same(runs, what):
  cfgs = {json.dumps(r.model_cfg, sort_keys=True, default=str) for r in runs}
  if len(cfgs) > 1:
    diffs = sorted({f"{k}={r.model_cfg.get(k)!r}" for r in runs for k in r.model_cfg
                    if any(r.model_cfg.get(k) != o.model_cfg.get(k) for o in runs)})
    raise EvalError(f"{what} needs runs of one architecture and variant; these differ in: "
                    + ", ".join(diffs))


def _order_policy(ev, run, passes, index: int = 0):
  """Baselines run in their original order, LayerShuffle runs in arbitrary order
  (``index`` > 0: another stream of random orders, e.g. for an ensemble's members)."""
  if run.variant in SHUFFLED:
    return ev.arbitrary_orders(run.depth, passes, salt=1 + 1000 * index), "arbitrary"
  return np.tile(np.arange(run.depth), (passes * ev.loader.steps_per_epoch, 1)), "sequential"


def mode_merge(ev, runs, merges: int = 100, base: str = "random", allow_repeats: bool = False,
               orders: int = 1, **_):
  _check_same(runs, "merging")
  compiled_before = ev.compilations() + merge_params._cache_size()
  depth = runs[0].depth
  rng = ev.rng(7)
  sources = merge_sources(rng, len(runs), depth, merges, allow_repeats)
  if base == "random":
    bases = rng.integers(0, len(runs), merges)
  else:
    if not 0 <= int(base) < len(runs):
      raise EvalError(f"--merge_base {base} is not a run index in [0, {len(runs)})")
    bases = np.full(merges, int(base))
  r0 = ev.run_for(runs[0].model_cfg)
  stacked = r0.replicate(stack_runs(runs))
  order, order_name = _order_policy(ev, runs[0], orders)
  originals = [ev.evaluate(r, order, None) for r in runs]
  results = []
  it = range(merges)
  if ev.progress:
    from tqdm import tqdm
    it = tqdm(it, desc="merged models", unit="model")
  for i in it:
    params = merge_params(stacked, jnp.asarray(sources[i]), jnp.asarray(bases[i]))
    results.append(ev.evaluate(runs[0], order, params=params))
  return {"mode": "merge", "setting": runs[0].setting, "order": order_name, "runs": len(runs),
          "merged": {"top1": summarize([m["top1"] for m in results]),
                     "top5": summarize([m["top5"] for m in results])},
          "originals": {"top1": summarize([m["top1"] for m in originals]),
                        "top5": summarize([m["top5"] for m in originals])},
          "models": [{"sources": s.tolist(), "base": int(b), **m}
                     for s, b, m in zip(sources, bases, results)],
          # programs compiled while evaluating the originals and all merged models
          "compilations": ev.compilations() + merge_params._cache_size() - compiled_before}


def mode_ensemble(ev, runs, orders: int = 1, **_):
  """Average of the runs' logits, each run in its own random order for every batch."""
  _check_same(runs, "an ensemble")
  depth = runs[0].depth
  r0 = ev.run_for(runs[0].model_cfg)
  model = r0.model
  stacked = r0.replicate(stack_runs(runs))

  @jax.jit
  def ens_step(stacked, batch, orders):
    logits = jax.lax.map(lambda po: model.apply({"params": po[0]}, batch["image"], po[1])["logits"],
                         (stacked, orders)).mean(0)
    labels, mask = batch["label"], batch["mask"]
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {"ce": (train_lib.cross_entropy(logits, labels) * mask).sum(),
            "top1": ((logits.argmax(-1) == labels) & mask).sum(),
            "top5": ((top5 == labels[:, None]).any(-1) & mask).sum(), "count": mask.sum()}

  # Run m sees, batch for batch, the orders its single-run evaluation sees.
  per_run = np.stack([_order_policy(ev, r, orders, m)[0] for m, r in enumerate(runs)])
  steps = ev.loader.steps_per_epoch
  passes = -(-per_run.shape[1] // steps)
  total = None
  for p in range(passes):
    for b, batch in enumerate(ev.loader.iterate(0)):
      o = r0.replicate(per_run[:, (p * steps + b) % per_run.shape[1]])
      s = ens_step(stacked, r0.to_global(batch), o)
      total = s if total is None else jax.tree.map(jnp.add, total, s)
  total = {k: float(v) for k, v in jax.device_get(total).items()}
  n = total["count"]
  single = [ev.evaluate(r, _order_policy(ev, r, orders, m)[0]) for m, r in enumerate(runs)]
  return {"mode": "ensemble", "setting": runs[0].setting, "runs": len(runs),
          "ensemble": {"top1": total["top1"] / n, "top5": total["top5"] / n, "loss": total["ce"] / n},
          "single": {"top1": summarize([s["top1"] for s in single]),
                     "top5": summarize([s["top5"] for s in single])}}


def mode_position(ev, runs, orders: int = 5, **_):
  predict = [r for r in runs if r.variant == "predict"]
  if not predict:
    raise EvalError("position mode needs LayerShuffle-predict runs (variant=predict)")
  per_run = []
  for r in predict:
    m = ev.evaluate(r, ev.arbitrary_orders(r.depth, orders), f"{os.path.basename(r.workdir)} position")
    per_run.append({"workdir": r.workdir, "position_accuracy": m["position_accuracy"],
                    "per_position": m["position_accuracy_per_position"], "top1": m["top1"]})
  return {"mode": "position", "runs": per_run,
          "position_accuracy": summarize([p["position_accuracy"] for p in per_run]),
          "per_position": np.mean([p["per_position"] for p in per_run], 0).tolist()}


def analysis_data(ev, run: TrainedRun, layer: int, images: int, chunk: int = 50):
  """For ``images`` validation images, one random order each: the chosen layer's whole
  output (all tokens) and position, and the L2 norm of every layer's additive
  contribution to the class token, ||cls_out - cls_in||, at the position it ran."""
  r = ev.run_for(run.model_cfg)
  model, depth = r.model, run.depth
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
  rng = ev.rng(13)
  src = ev.loader.source
  # More passes than validation images: images repeat, each time in a fresh order.
  pick = rng.choice(len(src), images, replace=images > len(src))
  orders = order_lib.random_orders(rng, len(pick), depth)
  feats, positions, contribs = [], [], []
  for i in range(0, len(pick), chunk):
    x = np.stack([ev.loader.preprocess(src[j][0]) for j in pick[i:i + chunk]])
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
  from lsvit import plots
  dist, val = [], []
  for l, row in enumerate(by_layer):
    for p, c in enumerate(plots.per_layer_normalised(row)):
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


def mode_analysis(ev, runs, layer: int = 0, images: int = 1000, out: Optional[str] = None, **_):
  from lsvit import plots
  results = []
  for r in runs:
    feats, positions, by_layer = analysis_data(ev, r, layer, images)
    emb = plots.umap_2d(feats, seed=ev.seed)
    name = os.path.basename(os.path.normpath(r.workdir))
    results.append({"workdir": r.workdir, "setting": r.setting, "embedding": emb,
                    "positions": positions, "contributions": by_layer, "name": name})
  files = []
  if out:
    files.append(plots.umap_panels(results, layer, os.path.join(out, "analysis_umap.png")))
    files.append(plots.ridge_panels(results, os.path.join(out, "analysis_contributions.png")))
  return {"mode": "analysis", "layer": layer, "images": int(images),
          "distinct_images": int(min(images, len(ev.loader.source))),
          "runs": [{"workdir": x["workdir"], "setting": x["setting"],
                    "contribution_distance_spearman": contribution_distance_spearman(x["contributions"]),
                    "position_knn_accuracy": position_knn_accuracy(x["embedding"], x["positions"], ev.seed),
                    "mean_contribution": [[float(np.mean(c)) if c else None for c in row]
                                          for row in x["contributions"]],
                    "positions_seen": np.bincount(x["positions"], minlength=len(x["contributions"])).tolist()}
                   for x in results],
          "figures": files}


MODE_FNS = {"sequential": mode_sequential, "arbitrary": mode_arbitrary, "prune": mode_prune,
            "merge": mode_merge, "ensemble": mode_ensemble, "position": mode_position,
            "analysis": mode_analysis}


def applicable_modes(runs) -> List[str]:
  modes = ["sequential", "arbitrary", "prune"]
  groups = _group(runs)
  if any(len(g) >= g[0].depth for g in groups.values()):
    modes.append("merge")
  if any(len(g) > 1 for g in groups.values()):
    modes.append("ensemble")
  if any(r.variant == "predict" for r in runs):
    modes.append("position")
  modes.append("analysis")
  return modes


# ----------------------------------------------------------------------------- tables and outputs

def _pm(s) -> str:
  return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s["n"] > 1 else f"{100 * s['mean']:.2f}"


def markdown(res: dict) -> str:
  m = res["mode"]
  if m in ("sequential", "arbitrary"):
    rows = ["| setting | runs | top-1 (%) | top-5 (%) |", "|---|---|---|---|"]
    for name, s in sorted(res["settings"].items()):
      rows.append(f"| {name} | {s[m]['top1']['n']} | {_pm(s[m]['top1'])} | {_pm(s[m]['top5'])} |")
    return f"**{m} order** (mean ± std over runs)\n\n" + "\n".join(rows)
  if m == "prune":
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
  if m == "merge":
    return "\n".join([
        f"**merged models** ({len(res['models'])} merged from {res['runs']} runs; no two layers from one run)",
        "", "| model | top-1 (%) | top-5 (%) | layer order |", "|---|---|---|---|",
        f"| {res['setting']} (the runs) | {_pm(res['originals']['top1'])} | "
        f"{_pm(res['originals']['top5'])} | {res['order']} |",
        f"| {res['setting']} merged | {_pm(res['merged']['top1'])} | {_pm(res['merged']['top5'])} | "
        f"{res['order']} |"])
  if m == "ensemble":
    e = res["ensemble"]
    return "\n".join([
        f"**ensemble** of {res['runs']} runs (mean of logits)", "",
        "| model | top-1 (%) | top-5 (%) |", "|---|---|---|",
        f"| {res['setting']} single runs | {_pm(res['single']['top1'])} | {_pm(res['single']['top5'])} |",
        f"| {res['setting']} ensemble | {100 * e['top1']:.2f} | {100 * e['top5']:.2f} |"])
  if m == "position":
    per = " | ".join(f"{100 * a:.2f}" for a in res["per_position"])
    n = len(res["per_position"])
    return "\n".join([
        f"**position prediction** accuracy: {_pm(res['position_accuracy'])} % over "
        f"{res['position_accuracy']['n']} run(s)", "",
        "| position | " + " | ".join(str(p) for p in range(n)) + " |", "|---|" + "---|" * n,
        f"| accuracy (%) | {per} |"])
  if m == "analysis":
    return (f"**analysis** of layer {res['layer']} over {res['images']} images: "
            + ", ".join(os.path.basename(f) for f in res["figures"]))
  raise EvalError(f"no table for mode {m}")


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


def run(workdirs, mode, out: Optional[str] = None, batch_size: Optional[int] = None,
        seed: int = 0, progress: bool = True, log=print, **opts) -> Dict[str, Any]:
  """Evaluates the runs in ``workdirs`` (globs allowed) in ``mode`` (a name, or a list of
  names sharing one checkpoint load and compilation); writes ``<out>/<mode>.json``,
  ``<out>/<mode>.md``, figures, and ``<out>/tables.md`` (every mode's table)."""
  for name in ("orders", "merges", "draws", "images"):
    if name in opts and (not isinstance(opts[name], int) or opts[name] < 1):
      raise EvalError(f"{name}={opts[name]!r}: must be a whole number >= 1")
  if str(opts.get("base", "random")) != "random" and not str(opts["base"]).isdigit():
    raise EvalError(f"merge base {opts['base']!r}: give a run index (0, 1, ...) or 'random'")
  asked = [mode] if isinstance(mode, str) else list(mode)
  for m in asked:
    if m not in MODES:
      raise EvalError(f"unknown mode {m!r}; choose one of {', '.join(MODES)}")
  runs = load_runs(workdirs)
  out = out or os.path.join(runs[0].workdir, "eval")
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
  ev = Evaluator(runs, batch_size, seed, progress)
  modes = applicable_modes(runs) if mode == "all" else asked
  results: Dict[str, Any] = {}
  tables = []
  for m in modes:
    if m in ("merge", "ensemble") and mode == "all":
      groups = [g for g in _group(runs).values()
                if (len(g) >= g[0].depth if m == "merge" else len(g) > 1)]
      res = [MODE_FNS[m](ev, g, **opts) for g in groups]
    elif m == "position" and mode == "all":
      res = [MODE_FNS[m](ev, runs, **opts)]
    elif m == "analysis":
      res = [MODE_FNS[m](ev, runs, out=out, **opts)]
    else:
      res = [MODE_FNS[m](ev, runs, **opts)]
    if m == "prune":
      res[0]["figures"] = [__import__("lsvit.plots", fromlist=["x"]).prune_plot(
          res[0], os.path.join(out, "prune.png"))]
    results[m] = res if len(res) > 1 else res[0]
    md = "\n\n".join(markdown(r) for r in res)
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
