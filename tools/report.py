"""RESULTS.md from the reproduction's evaluation JSON: our numbers beside the paper's,
and each of the paper's qualitative claims checked by a stated rule. Nothing here is
typed in by hand except the paper's own numbers (PAPER_*, quoted from its tables/text);
the facts of our runs are read from their workdirs and the evaluation JSON."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
from typing import Dict, List

import numpy as np

from lsvit import order as order_lib
from tools import machine

# The paper's numbers (top-1 %, mean ± std over 5 runs; Table 1, Table 2, Sec. 4.1-4.2).
PAPER_TABLE1 = {  # (dataset, model) -> {order: {approach: (mean, std)}}
    ("IN2012", "ViT-B/16"): {"sequential": {"baseline": (82.61, .08), "layershuffle": (75.22, .28),
                                            "position": (75.28, .18), "predict": (74.41, .20)},
                             "arbitrary": {"baseline": (0.13, .03), "layershuffle": (62.77, .41),
                                           "position": (63.61, .23), "predict": (61.18, 1.06)}},
    ("IN2012", "DeiT-B dist."): {"sequential": {"baseline": (81.16, .06), "layershuffle": (76.57, .12),
                                                "position": (76.18, .46), "predict": (75.08, .27)},
                                 "arbitrary": {"baseline": (0.12, .05), "layershuffle": (66.62, .4),
                                               "position": (65.89, 1.28), "predict": (64.51, .85)}},
    ("CIFAR-100", "ViT-B/16"): {"sequential": {"baseline": (89.62, .26), "layershuffle": (64.43, .95),
                                               "position": (61.98, .49), "predict": (60.88, .76)},
                                "arbitrary": {"baseline": (0.64, .13), "layershuffle": (54.34, 2.64),
                                              "position": (55.47, 1.41), "predict": (53.53, 1.45)}},
    ("CIFAR-100", "DeiT-B dist."): {"sequential": {"baseline": (87.31, .25), "layershuffle": (75.04, .83),
                                                   "position": (72.13, 1.5), "predict": (66.94, .6)},
                                    "arbitrary": {"baseline": (0.53, .16), "layershuffle": (64.99, .76),
                                                  "position": (64.31, 1.70), "predict": (58.77, 1.18)}},
}
PAPER_TABLE2 = {  # ImageNet2012, ViT-B/16: (top-1 mean, std, top-5 mean, std, order)
    "baseline merged": (1.87, 6.51, 4.53, 11.82, "sequential"),
    "layershuffle merged": (59.68, 1.15, 82.16, 1.03, "arbitrary"),
    "layershuffle ensemble": (69.26, None, 88.76, None, "arbitrary"),
}
PAPER_POSITION = 99.99
PAPER_FIG1_3LAYERS = {"layershuffle": 18, "layerdrop": 0}  # sequential order, read off Fig. 1b
PAPER_FIG1 = ("ImageNet2012, ViT-B/16, read from the paper's text (Fig. 1b/1c have no table): "
              "sequential order, 3 layers: LayerShuffle ~18 %, LayerDrop ~0 %; 6 layers: on par; "
              "9 layers: both 70-80 %, LayerDrop slightly ahead; reduced-depth refinements "
              "'significantly better' at 3 and 6 layers. Arbitrary order: only LayerShuffle "
              "succeeds, improving with more layers; LayerDrop poor at every depth.")
LABEL = {"baseline": "baseline", "layershuffle": "LS", "position": "LS-pos", "predict": "LS-pred",
         "layerdrop": "LayerDrop"}


def figure_dir(preset: str) -> str:
  return os.path.join("docs", "results", preset)


def _variant(setting: str) -> str:
  """'layerdrop p=0.2 (ViT ...)' -> 'layerdrop'; 'baseline keep 3 (...)' -> 'baseline keep 3'."""
  return re.sub(r" p=[0-9.e-]+", "", setting.split(" (")[0])


def _layerdrop_p(results) -> str:
  """'p=0.2' from the LayerDrop runs' setting label, '' without LayerDrop runs."""
  for setting in results["table1"]["sequential"]["settings"]:
    m = re.match(r"layerdrop (p=[0-9.e-]+)", setting)
    if m:
      return m.group(1)
  return ""


@dataclasses.dataclass(frozen=True)
class Facts:
  """What the report says about the runs, read from the grid's pretraining workdir."""
  train_images: int
  eval_images: int
  num_classes: int
  eval_batch: int
  batch: int
  impl: str
  width: int

  @classmethod
  def read(cls, out: str, preset) -> "Facts":
    from lsvit import data as data_lib
    from ml_collections import ConfigDict
    with open(os.path.join(out, "pretrain", "config.json")) as f:
      config = json.load(f)
    with open(os.path.join(out, "pretrain", "model.json")) as f:
      model = json.load(f)["model"]
    d = ConfigDict(config["data"])
    train = data_lib.get_source(d, d.train_split)
    return cls(len(train), len(data_lib.get_source(d, d.eval_split)), train.num_classes,
               config["eval_batch_size"], preset.batch_size or config["batch_size"],
               model["impl"], model["width"])


def _paper_ratio() -> str:
  """The paper's LS arbitrary / baseline sequential over its four (data, model) pairs."""
  r = [t["arbitrary"]["layershuffle"][0] / t["sequential"]["baseline"][0]
       for t in PAPER_TABLE1.values()]
  return f"{min(r):.2f}-{max(r):.2f}"


def _paper_in1k_vit(order: str, approach: str):
  return PAPER_TABLE1[("IN2012", "ViT-B/16")][order][approach]


def _settings(res: dict) -> Dict[str, dict]:
  return {_variant(k): v for k, v in res["settings"].items()}


def _pm(mean, std=None, scale=100.0) -> str:
  if std is None:
    return f"{scale * mean:.1f}"
  return f"{scale * mean:.1f} ± {scale * std:.1f}"


ALPHA = 0.05  # one-sided level of every verdict


@dataclasses.dataclass
class Stat:
  """A mean over runs (or one measurement with its standard error), in percent points."""
  mean: float
  sd: float
  n: int

  @classmethod
  def of(cls, s: dict, scale: float = 100.0) -> "Stat":  # an evaluation STAT {mean, std, n}
    return cls(scale * s["mean"], scale * s["std"], int(s["n"]))

  @property
  def se2(self) -> float:
    return self.sd ** 2 / self.n if self.n > 1 else 0.0

  def __str__(self):
    return f"{self.mean:.1f} ± {self.sd:.1f}" if self.n > 1 else f"{self.mean:.1f}"


def greater(a: Stat, b: Stat, margin: float = 0.0, factor: float = 1.0):
  """One-sided Welch test of a - factor * b > margin: (t, p). A side with one value and no
  standard error counts as exact."""
  from scipy import stats
  diff = a.mean - factor * b.mean - margin
  parts = [(a.se2, a.n), (factor ** 2 * b.se2, b.n)]
  se2 = sum(v for v, _ in parts)
  if se2 == 0:
    return (np.inf if diff > 0 else -np.inf), (0.0 if diff > 0 else 1.0)
  df = se2 ** 2 / sum(v ** 2 / (n - 1) for v, n in parts if n > 1 and v > 0)
  t = diff / np.sqrt(se2)
  return float(t), float(stats.t.sf(t, df))


def verdict(p_yes: float, p_no: float) -> str:
  """'yes' when the data support the rule at ALPHA, 'no' when they support its opposite,
  'within noise' otherwise."""
  if p_yes < ALPHA:
    return "yes"
  if p_no < ALPHA:
    return "no"
  return "within noise"


@dataclasses.dataclass
class Claim:
  text: str       # the paper's claim
  rule: str       # how we decide, in words
  ours: str       # the numbers the rule looked at
  verdict: str    # yes | no | within noise
  test: str       # the statistic behind the verdict
  why: str = ""   # if it does not hold: a hypothesis from these numbers (untested)

  @property
  def holds(self) -> bool:
    return self.verdict == "yes"


def rule_greater(a: Stat, b: Stat, margin: float = 0.0, factor: float = 1.0):
  """(verdict, test) for 'a - factor * b > margin' (Welch, one-sided)."""
  t, p = greater(a, b, margin, factor)
  return verdict(p, 1.0 - p), f"t = {t:.2f}, p = {p:.3g}"


def rule_all(parts):
  """Several rules that must all hold: yes if all are yes, no if any is no."""
  vs = [v for v, _ in parts]
  v = "yes" if all(x == "yes" for x in vs) else "no" if "no" in vs else "within noise"
  return v, "; ".join(t for _, t in parts)


def rule_within(a: Stat, b: Stat, margin: float):
  """|a - b| <= margin: two one-sided tests (yes: both inside; no: one side clearly out)."""
  _, p_hi = greater(b, a, -margin)  # a - b < margin
  _, p_lo = greater(a, b, -margin)  # a - b > -margin
  _, out_hi = greater(a, b, margin)
  _, out_lo = greater(b, a, margin)
  v = "yes" if max(p_hi, p_lo) < ALPHA else "no" if min(out_hi, out_lo) < ALPHA else \
      "within noise"
  return v, f"TOST p = {max(p_hi, p_lo):.3g}"


def proportion(p: float, n: int) -> Stat:
  """An accuracy over n independent items as a Stat (binomial standard error)."""
  pct = 100 * p
  return Stat(pct, np.sqrt(max(pct * (100 - pct), 1e-9)), n)  # se^2 = p (1 - p) / n


def claims(results: dict, depth: int, facts: Facts, preset) -> List[Claim]:
  num_classes = facts.num_classes
  recipe = (f"{preset.epochs} epochs at lr {preset.lr:g} on {facts.train_images:,} images")
  t1 = results["table1"]
  seq, arb = _settings(t1["sequential"]), _settings(t1["arbitrary"])
  st = lambda table, v, kind: Stat.of(table[v][kind]["top1"])
  bs, ba = st(seq, "baseline", "sequential"), st(arb, "baseline", "arbitrary")
  ls_s, ls_a = st(seq, "layershuffle", "sequential"), st(arb, "layershuffle", "arbitrary")
  pos_a, pred_a = st(arb, "position", "arbitrary"), st(arb, "predict", "arbitrary")
  shuffled = ("layershuffle", "position", "predict")
  spread = lambda x, y: "more" if x.sd > y.sd else "less"
  out = [
      Claim("The baseline fails catastrophically in arbitrary order.",
            "baseline arbitrary < 30 % of baseline sequential",
            f"{ba} vs {bs} (chance {100 / num_classes:.0f})", *_lt_ratio(ba, bs, 0.3)),
      Claim("LayerShuffle keeps most of its accuracy in arbitrary order "
            f"(paper: LS arbitrary = {_paper_ratio()} x baseline sequential).",
            "LS arbitrary >= 0.6 x baseline sequential",
            f"{ls_a} vs {bs} = {ls_a.mean / bs.mean:.2f}x", *rule_greater(ls_a, bs, 0, 0.6)),
      Claim("In the original order LayerShuffle is somewhat below the baseline.",
            "LS sequential < baseline sequential", f"{ls_s} vs {bs}", *rule_greater(bs, ls_s)),
      Claim("For every LayerShuffle approach the original order beats an arbitrary one.",
            "sequential > arbitrary for LS, LS-pos, LS-pred",
            ", ".join(f"{LABEL[v]} {st(seq, v, 'sequential')} / {st(arb, v, 'arbitrary')}"
                      for v in shuffled),
            *rule_all([rule_greater(st(seq, v, "sequential"), st(arb, v, "arbitrary"))
                       for v in shuffled]),
            "The paper explains its gap by the refinement starting from a sequential model; ours "
            f"moves much further from its start ({recipe} vs the paper's small lr on ImageNet), "
            "so less of the sequential model's preference is left."),
      Claim("Giving layers their position (LS-pos) changes little.",
            "|LS-pos arbitrary - LS arbitrary| <= 3 points", f"{pos_a} vs {ls_a}",
            *rule_within(pos_a, ls_a, 3.0),
            f"LS-pos {'is below' if pos_a.mean < ls_a.mean else 'is above'} LS here and varies "
            f"{spread(pos_a, ls_a)} across seeds ({pos_a.sd:.1f} vs {ls_a.sd:.1f}): its position "
            f"embedding and projection start from their initialisation inside an already trained "
            f"block, which {recipe} may not settle."),
      Claim("With their positions, ViT layers do better in arbitrary order (paper, ImageNet "
            f"ViT-B/16: LS-pos {_paper_in1k_vit('arbitrary', 'position')[0]:.2f} vs LS "
            f"{_paper_in1k_vit('arbitrary', 'layershuffle')[0]:.2f}).",
            "LS-pos arbitrary > LS arbitrary", f"{pos_a} vs {ls_a}", *rule_greater(pos_a, ls_a)),
      Claim("LS-pred is outperformed by LS and LS-pos in arbitrary order.",
            "LS-pred arbitrary < LS and < LS-pos arbitrary",
            f"{pred_a} vs {ls_a} / {pos_a}",
            *rule_all([rule_greater(ls_a, pred_a), rule_greater(pos_a, pred_a)])),
  ]
  if "position" in results:
    po = results["position"]["position"]
    acc = Stat.of(po["position_accuracy"])
    worst = int(np.argmin(po["per_position"]))
    out.append(Claim(f"Each layer's position is predictable from its output ({PAPER_POSITION} %).",
                     "position accuracy >= 95 %", f"{acc} % (chance {100 / depth:.1f} %)",
                     *rule_greater(acc, Stat(95.0, 0, 1)),
                     f"Per position (table below) the accuracy ranges from "
                     f"{100 * min(po['per_position']):.0f} % (position {worst}) to "
                     f"{100 * max(po['per_position']):.0f} %: with width {facts.width} and a "
                     f"short refinement the inputs of some positions differ less than in a "
                     f"768-wide ViT-B/16."))
  if "merge_layershuffle" in results:
    ml = results["merge_layershuffle"]["merge"]
    mb = results["merge_baseline"]["merge"]
    a, o = Stat.of(ml["merged"]["top1"]), Stat.of(ml["originals"]["top1"])
    paper_merged = PAPER_TABLE2["layershuffle merged"][0]
    paper_ls = _paper_in1k_vit("arbitrary", "layershuffle")[0]
    out.append(Claim(f"Merged LayerShuffle models are close to their sources (paper: "
                     f"{paper_merged:.1f} vs {paper_ls:.1f}).",
                     "LS merged >= source mean - 5 points", f"{a} vs {o}",
                     *rule_greater(a, o, -5.0),
                     f"Merged models lose {o.mean - a.mean:.1f} points here against "
                     f"{paper_ls - paper_merged:.1f} in the paper: refinements that change the "
                     f"model more ({recipe}) leave independently refined layers further apart; a "
                     f"smaller learning rate or fewer epochs would keep them closer (not tested)."))
    b, bo = Stat.of(mb["merged"]["top1"]), Stat.of(mb["originals"]["top1"])
    out.append(Claim(f"Merged baselines are unusable even in their sequential order (paper: "
                     f"{PAPER_TABLE2['baseline merged'][0]:.2f} %).",
                     "baseline merged < 30 % of its sources", f"{b} vs {bo}",
                     *_lt_ratio(b, bo, 0.3),
                     f"Merged baselines keep {100 * b.mean / bo.mean:.0f} % of their sources' "
                     f"accuracy: refined sequentially for {preset.baseline_epochs or preset.epochs}"
                     f" epochs, the {mb['runs']} baselines' layers stay interchangeable in their "
                     f"original order; the paper's ImageNet refinements evidently diverged more."))
    out.append(Claim("Merged models vary more than the models they come from (paper: std "
                     f"{PAPER_TABLE2['layershuffle merged'][1]:.2f} vs "
                     f"{_paper_in1k_vit('arbitrary', 'layershuffle')[1]:.2f}).",
                     "std of LS merged > std of the LS sources (F-test)",
                     f"std {a.sd:.2f} over {a.n} merged vs {o.sd:.2f} over {o.n} sources",
                     *_more_spread(a, o)))
  if "ensemble_layershuffle" in results:
    e = results["ensemble_layershuffle"]["ensemble"]
    single = Stat.of(e["single"]["top1"])
    ens = Stat(100 * e["ensemble"]["top1"], 0, 1)
    out.append(Claim(f"An ensemble of the LayerShuffle models beats a single one ("
                     f"{PAPER_TABLE2['layershuffle ensemble'][0]:.1f} vs "
                     f"{_paper_in1k_vit('arbitrary', 'layershuffle')[0]:.1f}).",
                     "ensemble top-1 > mean single top-1", f"{ens} vs {single}",
                     *rule_greater(ens, single)))
  if "prune" in results:
    p = _settings(results["prune"]["prune"])
    ks = [k for k in results["prune"]["prune"]["ks"] if k != depth] + [depth]
    at = lambda v, k, kind: Stat.of(p[v][f"k{k}_{kind}"]["top1"])
    ls_arb = [at("layershuffle", k, "arbitrary") for k in ks]
    out.append(Claim("Pruning degrades LayerShuffle gracefully: arbitrary-order accuracy rises with "
                     "the number of layers kept.", "LS arbitrary top-1 rising with k",
                     ", ".join(f"k={k}: {a}" for k, a in zip(ks, ls_arb)),
                     *rule_all([rule_greater(b, a) for a, b in zip(ls_arb, ls_arb[1:])])))
    ld_arb = [at("layerdrop", k, "arbitrary") for k in ks]
    out.append(Claim("In arbitrary order only LayerShuffle succeeds; LayerDrop fails at every depth.",
                     "LayerDrop arbitrary < LS arbitrary at every k",
                     ", ".join(f"k={k}: {d} vs {a}" for k, d, a in zip(ks, ld_arb, ls_arb)),
                     *rule_all([rule_greater(a, d) for d, a in zip(ld_arb, ls_arb)])))
    k0 = ks[0]
    ls3, ld3 = at("layershuffle", k0, "sequential"), at("layerdrop", k0, "sequential")
    out.append(Claim(f"With few layers ({k0}) kept in the original order LayerShuffle beats LayerDrop "
                     f"(paper, 3 layers: ~{PAPER_FIG1_3LAYERS['layershuffle']} % vs "
                     f"~{PAPER_FIG1_3LAYERS['layerdrop']} %).", f"LS > LayerDrop at k={k0}, sequential",
                     f"{ls3} vs {ld3}", *rule_greater(ls3, ld3)))
    k_hi = max([k for k in ks if k < depth] or [depth])
    ls9, ld9 = at("layershuffle", k_hi, "sequential"), at("layerdrop", k_hi, "sequential")
    out.append(Claim(f"With most layers ({k_hi}) kept in the original order LayerDrop is slightly "
                     "ahead of LayerShuffle (paper, 9 layers).",
                     f"LayerDrop > LS at k={k_hi}, sequential", f"{ld9} vs {ls9}",
                     *rule_greater(ld9, ls9)))
    kept = [k for k in ks if f"baseline keep {k}" in p]
    if kept:
      parts, rows = [], []
      for k in kept[:2]:
        r = at(f"baseline keep {k}", k, "sequential")
        best = max((at(v, k, "sequential") for v in ("layershuffle", "layerdrop")),
                   key=lambda x: x.mean)
        rows.append(f"k={k}: {r} vs {best}")
        parts.append(rule_greater(r, best))
      out.append(Claim("Models refined at reduced depth beat pruned LS/LayerDrop models at few layers.",
                       "refined-at-k > best of LS, LayerDrop at k (sequential), for the smallest k",
                       ", ".join(rows), *rule_all(parts)))
  if "analysis" in results:
    a = results["analysis"]["analysis"]
    by = {_variant(r["setting"]): r for r in a["runs"]}
    if "layershuffle" in by and "baseline" in by:
      points = a["images"] * depth  # (image, layer) pairs behind each rho
      rho = {v: by[v]["contribution_distance_spearman"] for v in ("baseline", "layershuffle")}
      out.append(Claim("A LayerShuffle layer contributes less the further it runs from its original "
                       "position; a baseline layer's contribution does not depend on it (Fig. 4c/d).",
                       "Spearman rho(|position - original|, contribution) of LS < baseline's - 0.2",
                       f"LS {rho['layershuffle']:+.2f}, baseline {rho['baseline']:+.2f}",
                       *_rho_lower(rho, points),
                       f"The two rhos are {rho['layershuffle']:+.2f} and {rho['baseline']:+.2f}: "
                       "contributions hardly depend on the distance from the original position in "
                       "either model here (see the ridge plots); the paper read this effect off a "
                       "ViT-B/16 whose layers are far more specialised than these "
                       f"{facts.width}-wide ones."))
      knn = {v: proportion(by[v]["position_knn_accuracy"], a["images"])
             for v in ("baseline", "layershuffle")}
      out.append(Claim("A LayerShuffle layer's output occupies different regions depending on its "
                       "position; the baseline's shows no clear ordering (Fig. 4a/b).",
                       "position decodable from the 2-D UMAP (10-NN, 5-fold) better for LS than "
                       "baseline (two-proportion test over the images)",
                       f"LS {knn['layershuffle'].mean:.1f} %, baseline {knn['baseline'].mean:.1f} % "
                       f"(chance {100 / depth:.1f} %)",
                       *rule_greater(knn["layershuffle"], knn["baseline"])))
  return out


def _lt_ratio(a: Stat, b: Stat, ratio: float):
  """(verdict, test) for a < ratio * b."""
  t, p = greater(a, b, 0.0, ratio)  # p: evidence for the opposite, a > ratio * b
  return verdict(1.0 - p, p), f"t = {-t:.2f}, p = {1.0 - p:.3g}"


def _more_spread(a: Stat, b: Stat):
  """(verdict, test) for sd(a) > sd(b), a one-sided F-test of the variances."""
  from scipy import stats
  if a.n < 2 or b.n < 2 or b.sd == 0:
    return "within noise", "too few values for an F-test"
  f = (a.sd / b.sd) ** 2
  p = float(stats.f.sf(f, a.n - 1, b.n - 1))
  return verdict(p, 1 - p), f"F = {f:.2f}, p = {p:.3g}"


def _rho_lower(rho: dict, n: int):
  """(verdict, test) for rho_LS < rho_baseline - 0.2, on Fisher's scale (z-test)."""
  from scipy import stats
  se = 1.06 * np.sqrt(2.0 / max(n - 3, 1))
  target = np.arctanh(np.clip(rho["baseline"] - 0.2, -0.999999, 0.999999))
  zl = np.arctanh(np.clip(rho["layershuffle"], -0.999999, 0.999999))
  zs = (target - zl) / se
  p = float(stats.norm.sf(zs))
  return verdict(p, 1 - p), f"z = {zs:.2f}, p = {p:.3g} (Fisher, n = images x layers)"


def _arch(results) -> str:
  """'ViT L12 D64 P2' from a setting label."""
  return next(iter(results["table1"]["sequential"]["settings"])).split(" (", 1)[1].rstrip(")")


def _table1(results) -> str:
  t1 = results["table1"]
  arch = _arch(results)
  seq, arb = _settings(t1["sequential"]), _settings(t1["arbitrary"])
  cols = [v for v in order_lib.VARIANTS if v in seq]
  label = lambda v: f"{LABEL[v]} {_layerdrop_p(results)}" if v == "layerdrop" else LABEL[v]
  head = "| data | model | layer order | pretrained | " + " | ".join(map(label, cols)) + " |"
  rows = [head, "|---|---|---|---|" + "---|" * len(cols)]
  for kind, table in (("sequential", seq), ("arbitrary", arb)):
    cells = []
    for v in cols:
      x = table[v][kind]["top1"]
      cells.append(f"**{_pm(x['mean'], x['std'])}**")
    pt = results["pretrained"][kind]["runs"][0]
    rows.append(f"| digits (ours) | {arch} | {kind} | {100 * pt[kind]['top1']:.1f} | "
                + " | ".join(cells) + " |")
  for (data, model), t in PAPER_TABLE1.items():
    for kind in ("sequential", "arbitrary"):
      cells = [f"{t[kind][v][0]:.2f} ± {t[kind][v][1]:.2f}" if v in t[kind] else "–" for v in cols]
      rows.append(f"| {data} (paper) | {model} | {kind} | – | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def _prune_table(results) -> str:
  pr = results["prune"]["prune"]
  p = _settings(pr)
  ks = pr["ks"]
  rows = ["| setting | " + " | ".join(f"k={k} seq | k={k} arb" for k in ks) + " |",
          "|---|" + "---|---|" * len(ks)]
  for name in sorted(p):
    cells = []
    for k in ks:
      for kind in ("sequential", "arbitrary"):
        x = p[name].get(f"k{k}_{kind}")
        cells.append(_pm(x["top1"]["mean"], x["top1"]["std"]) if x else "–")
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def _merge_table(results) -> str:
  ml, mb = results["merge_layershuffle"]["merge"], results["merge_baseline"]["merge"]
  e = results["ensemble_layershuffle"]["ensemble"]
  t = lambda x: f"{_pm(x['top1']['mean'], x['top1']['std'])} | {_pm(x['top5']['mean'], x['top5']['std'])}"
  p = PAPER_TABLE2
  paper = lambda order, approach: "{:.2f} ± {:.2f}".format(*_paper_in1k_vit(order, approach))
  pp = lambda k: (f"{p[k][0]:.2f}" + (f" ± {p[k][1]:.2f}" if p[k][1] is not None else "") + " | "
                  + f"{p[k][2]:.2f}" + (f" ± {p[k][3]:.2f}" if p[k][3] is not None else ""))
  return "\n".join([
      "| model | ours top-1 | ours top-5 | paper top-1 (IN2012 ViT-B/16) | paper top-5 | layer order |",
      "|---|---|---|---|---|---|",
      f"| baseline, the {mb['runs']} runs | {t(mb['originals'])} | {paper('sequential', 'baseline')} | – | sequential |",
      f"| baseline merged ({len(mb['models'])} models) | {t(mb['merged'])} | {pp('baseline merged')} | sequential |",
      f"| LayerShuffle, the {ml['runs']} runs | {t(ml['originals'])} | {paper('arbitrary', 'layershuffle')} | – | arbitrary |",
      f"| LayerShuffle merged ({len(ml['models'])} models) | {t(ml['merged'])} | {pp('layershuffle merged')} | arbitrary |",
      f"| LayerShuffle ensemble of {e['runs']} | {100 * e['ensemble']['top1']:.1f} | "
      f"{100 * e['ensemble']['top5']:.1f} | {pp('layershuffle ensemble')} | arbitrary |"])


def _versions() -> str:
  import importlib.metadata as md
  pk = []
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scikit-learn", "umap-learn"):
    try:
      pk.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
      pass
  return ", ".join([f"Python {platform.python_version()}"] + pk)


def write(results: dict, preset, name: str, out: str, path: str, command: str, timing: dict) -> str:
  """Writes ``path`` and copies the figures and JSON next to it under docs/results/<name>."""
  base = os.path.dirname(os.path.abspath(path))
  fig_rel = figure_dir(name)
  fig_abs = os.path.join(base, fig_rel)
  os.makedirs(fig_abs, exist_ok=True)
  ev = os.path.join(out, "eval")
  for sub in sorted(os.listdir(ev)):
    for f in sorted(os.listdir(os.path.join(ev, sub))):
      if f.endswith((".png", ".json")):
        shutil.copy(os.path.join(ev, sub, f), os.path.join(fig_abs, f"{sub}_{f}"))
  fig = lambda sub, f: f"![{sub} {f}]({fig_rel}/{sub}_{f})"
  facts = Facts.read(out, preset)
  cl = claims(results, preset.depth, facts, preset)
  table1 = results["table1"]["arbitrary"]["runs"][0]["arbitrary"]
  passes = -(-table1["orders"] // -(-table1["examples"] // facts.eval_batch))
  train_s = sum(timing.get("train_s", {}).values())
  last = timing.get("last_invocation", {})
  per_run = sorted(timing.get("train_s", {}).values())
  lines = [
      f"# Results: LayerShuffle at digits scale ({name} preset)",
      "",
      "Generated by `tools/report.py` from the evaluation JSON -- do not edit by hand. Regenerate with",
      "",
      f"    {command}",
      "",
      f"- Date: {datetime.date.today().isoformat()}; machine: {machine.describe()}",
      f"- Versions: {_versions()}",
      f"- Data: scikit-learn's real 8x8 handwritten digits ({facts.train_images:,} train / "
      f"{facts.eval_images:,} validation, {facts.num_classes} classes, chance "
      f"{100 / facts.num_classes:.0f} %), the stand-in for ImageNet2012 / CIFAR-100.",
      f"- Model: {_arch(results)} ({preset.depth} layers as ViT-B/16; `configs/{preset.config}.py` with "
      f"{', '.join(preset.overrides) or 'no overrides'}; trained with impl='{facts.impl}').",
      f"- Stand-in for the public pretrained checkpoint: a sequential model trained from scratch "
      f"({preset.pretrain_epochs} epochs, lr {preset.pretrain_lr:g}), the `pretrained` column. Every "
      f"other run refines it at lr {preset.lr:g} (Adam, linear decay, clip 1.0, batch "
      f"{facts.batch}): the sequential baselines for {preset.baseline_epochs or preset.epochs} "
      f"epochs, the others for {preset.epochs} (the paper refines its baselines 1/5 to 1/20 as "
      f"long as the LayerShuffle models), {preset.seeds} seeds per approach, {preset.merge_count} "
      f"baseline and LayerShuffle runs for merging, reduced-depth refinements keeping "
      f"{', '.join(map(str, preset.keep))} layers ({preset.keep_seeds} seeds).",
      f"- Arbitrary order: {passes} passes over the validation split, a fresh random order for "
      f"every batch of {facts.eval_batch}; the best-validation-loss checkpoint of each run.",
      f"- Compute: {len(per_run)} training runs took {train_s / 60:.1f} process-minutes"
      + (f" (median {np.median(per_run):.0f} s per run)" if per_run else "")
      + (f"; the last invocation spent {last.get('train_s', 0) / 60:.1f} min training "
         f"with {last.get('workers')} worker(s) and {last.get('eval_s', 0) / 60:.1f} min evaluating."
         if last else "."),
      "",
      "## Which of the paper's claims reproduce at this scale",
      "",
      "Each row is decided by the rule shown, computed from the numbers below (mean ± std over "
      "seeds), with a one-sided test at the 5 % level: **yes** when the data support the rule, "
      "**no** when they support its opposite, *within noise* when they support neither. Welch's "
      "t over seeds (a single number counts as exact); equivalence by two one-sided tests; "
      "spreads by an F-test; accuracies of one run by the binomial error over its images.",
      "",
      "| paper's claim | rule | ours | test | reproduces |",
      "|---|---|---|---|---|",
  ]
  shown = {"yes": "yes", "no": "**no**", "within noise": "*within noise*"}
  for c in cl:
    lines.append(f"| {c.text} | {c.rule} | {c.ours} | {c.test} | {shown[c.verdict]} |")
  count = {v: sum(c.verdict == v for c in cl) for v in shown}
  lines += ["", f"Of {len(cl)} claims, {count['yes']} hold at this scale, {count['no']} do not, "
                f"and {count['within noise']} cannot be told from noise with these runs."]
  failed = [c for c in cl if c.verdict != "yes" and c.why]
  if failed:
    lines += ["", "Where a claim does not hold, a likely reason (a hypothesis from these numbers, "
                  "not a measurement):", ""]
    lines += [f"- *{c.text}* {c.why}" for c in failed]
  lines += ["",
            "## Table 1: sequential vs arbitrary layer order (top-1 %, mean ± std over seeds)", "",
            _table1(results), "",
            "LayerDrop is not in the paper's Table 1 (it is in Fig. 1b/1c); the `pretrained` column is "
            "the sequentially trained stand-in the runs were refined from.", ""]
  if "prune" in results:
    lines += ["## Fig. 1b/1c: pruning layers at test time (top-1 %, mean ± std over seeds)", "",
              f"Random subsets of k layers ({results['prune']['prune']['draws']} per batch position), "
              f"kept in their original order (seq) or "
              f"shuffled (arb). `baseline keep k` are refinements of the first k pretrained layers, "
              f"evaluated at their own depth.", "",
              _prune_table(results), "", fig("prune", "prune.png"), "",
              f"Paper: {PAPER_FIG1}", ""]
  if "merge_layershuffle" in results:
    lines += ["## Table 2: merged models and the ensemble", "",
              "Each merged model takes layer l from a different run (no two layers from one run), "
              "embedding and head from a random run; baselines run in their original order, "
              "LayerShuffle models in arbitrary order.", "", _merge_table(results), ""]
  if "position" in results:
    po = results["position"]["position"]
    per = " | ".join(f"{100 * a:.1f}" for a in po["per_position"])
    lines += ["## Position prediction (LS-pred)", "",
              f"Accuracy of every layer's position head, arbitrary order: "
              f"**{_pm(po['position_accuracy']['mean'], po['position_accuracy']['std'], 100)} %** over "
              f"{po['position_accuracy']['n']} runs (paper: {PAPER_POSITION} %).", "",
              "| position | " + " | ".join(str(i) for i in range(len(po["per_position"]))) + " |",
              "|---|" + "---|" * len(po["per_position"]), f"| accuracy (%) | {per} |", ""]
  if "analysis" in results:
    a = results["analysis"]["analysis"]
    lines += ["## Fig. 4: where a layer's output lives, and how much each layer contributes", "",
              f"Layer {a['layer']}'s whole output (all tokens) for {a['images']} forward passes of "
              f"validation images, each in a fresh random order, projected by UMAP and coloured by the "
              f"position the layer ran at; the pretrained model is the baseline, as in the paper "
              f"(which used the original ViT-B/16 weights).", "",
              fig("analysis", "analysis_umap.png"), "",
              "Contribution of each layer (rows, original order top to bottom) to the class token, "
              "||cls_out - cls_in||, by the position it ran at (colour: dark = near the input).", "",
              fig("analysis", "analysis_contributions.png"), ""]
  lines += ["## Raw results", "",
            f"Every evaluation's JSON is in `{fig_rel}/` (schema in the README); the runs are in "
            f"`{os.path.relpath(out, base) if out.startswith(base) else out}`.", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
