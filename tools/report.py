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


@dataclasses.dataclass
class Claim:
  text: str       # the paper's claim
  rule: str       # how we decide, in words
  ours: str       # the numbers the rule looked at
  holds: bool
  why: str = ""   # if it does not hold: a hypothesis (untested unless it says so)


def claims(results: dict, depth: int, facts: Facts, preset) -> List[Claim]:
  num_classes = facts.num_classes
  recipe = (f"{preset.epochs} epochs at lr {preset.lr:g} on {facts.train_images:,} images")
  t1 = results["table1"]
  seq, arb = _settings(t1["sequential"]), _settings(t1["arbitrary"])
  m = lambda table, v, kind: table[v][kind]["top1"]["mean"] * 100
  s = lambda table, v, kind: table[v][kind]["top1"]["std"] * 100
  bs, ba = m(seq, "baseline", "sequential"), m(arb, "baseline", "arbitrary")
  ls_s, ls_a = m(seq, "layershuffle", "sequential"), m(arb, "layershuffle", "arbitrary")
  pos_a, pred_a = m(arb, "position", "arbitrary"), m(arb, "predict", "arbitrary")
  out = [
      Claim("The baseline fails catastrophically in arbitrary order.",
            "baseline arbitrary < 30 % of baseline sequential",
            f"{ba:.1f} vs {bs:.1f} (chance {100 / num_classes:.0f})", ba < 0.3 * bs),
      Claim("LayerShuffle keeps most of its accuracy in arbitrary order "
            f"(paper: LS arbitrary = {_paper_ratio()} x baseline sequential).",
            "LS arbitrary >= 0.6 x baseline sequential", f"{ls_a:.1f} vs {bs:.1f} = {ls_a / bs:.2f}x",
            ls_a >= 0.6 * bs),
      Claim("In the original order LayerShuffle is somewhat below the baseline.",
            "LS sequential < baseline sequential", f"{ls_s:.1f} vs {bs:.1f}", ls_s < bs),
      Claim("For every LayerShuffle approach the original order beats an arbitrary one.",
            "sequential > arbitrary for LS, LS-pos, LS-pred",
            ", ".join(f"{LABEL[v]} {m(seq, v, 'sequential'):.1f} / {m(arb, v, 'arbitrary'):.1f}"
                      for v in ("layershuffle", "position", "predict")),
            all(m(seq, v, "sequential") > m(arb, v, "arbitrary") for v in ("layershuffle", "position", "predict")),
            "The two orders are within a seed's spread of each other here. The paper explains its gap by "
            "the refinement starting from a sequential model; ours moves much further from its start "
            f"({recipe} vs the paper's small lr on ImageNet), so less of the "
            "sequential model's preference is left."),
      Claim("Giving layers their position (LS-pos) changes little.",
            "|LS-pos arbitrary - LS arbitrary| <= 3 points",
            f"{pos_a:.1f} ± {s(arb, 'position', 'arbitrary'):.1f} vs {ls_a:.1f} ± "
            f"{s(arb, 'layershuffle', 'arbitrary'):.1f}", abs(pos_a - ls_a) <= 3,
            "LS-pos is worse and varies more across seeds here: its position embedding and projection "
            f"start from scratch inside an already trained block, which {recipe} may "
            "not settle."),
      Claim("LS-pred is outperformed by LS and LS-pos in arbitrary order.",
            "LS-pred arbitrary < LS and < LS-pos arbitrary",
            f"{pred_a:.1f} vs {ls_a:.1f} / {pos_a:.1f}", pred_a < ls_a and pred_a < pos_a),
  ]
  if "position" in results:
    acc = results["position"]["position"]["position_accuracy"]["mean"] * 100
    out.append(Claim(f"Each layer's position is predictable from its output ({PAPER_POSITION} %).",
                     "position accuracy >= 95 %", f"{acc:.2f} % (chance {100 / depth:.1f} %)", acc >= 95,
                     "The first and last positions are read almost perfectly and the middle ones are "
                     f"confused (per-position table below): with width {facts.width} and a short "
                     "refinement the middle layers' inputs differ less by position than in a "
                     "768-wide ViT-B/16."))
  if "merge_layershuffle" in results:
    ml = results["merge_layershuffle"]["merge"]
    mb = results["merge_baseline"]["merge"]
    a, o = ml["merged"]["top1"]["mean"] * 100, ml["originals"]["top1"]["mean"] * 100
    paper_merged = PAPER_TABLE2["layershuffle merged"][0]
    paper_ls = _paper_in1k_vit("arbitrary", "layershuffle")[0]
    out.append(Claim(f"Merged LayerShuffle models are close to their sources (paper: "
                     f"{paper_merged:.1f} vs {paper_ls:.1f}).",
                     "LS merged >= source mean - 5 points", f"{a:.1f} vs {o:.1f}", a >= o - 5,
                     "Merging works (far above chance, baselines aside) but loses more than in the paper. "
                     "Our LayerShuffle refinements change the model far more than the paper's, so "
                     "independently refined layers have drifted further apart; a smaller learning rate "
                     "or fewer epochs would keep them closer (not tested here)."))
    b, bo = mb["merged"]["top1"]["mean"] * 100, mb["originals"]["top1"]["mean"] * 100
    out.append(Claim(f"Merged baselines are unusable even in their sequential order (paper: "
                     f"{PAPER_TABLE2['baseline merged'][0]:.2f} %).",
                     "baseline merged < 30 % of its sources", f"{b:.1f} vs {bo:.1f}", b < 0.3 * bo,
                     "Refining a sequential model sequentially barely moves its layers on this small "
                     f"data, so layers of the {mb['runs']} baselines are still interchangeable when kept in their "
                     "original order; the paper's ImageNet refinements evidently diverged more."))
  if "ensemble_layershuffle" in results:
    e = results["ensemble_layershuffle"]["ensemble"]
    out.append(Claim(f"An ensemble of the LayerShuffle models beats a single one ("
                     f"{PAPER_TABLE2['layershuffle ensemble'][0]:.1f} vs "
                     f"{_paper_in1k_vit('arbitrary', 'layershuffle')[0]:.1f}).",
                     "ensemble top-1 > mean single top-1",
                     f"{100 * e['ensemble']['top1']:.1f} vs {100 * e['single']['top1']['mean']:.1f}",
                     e["ensemble"]["top1"] > e["single"]["top1"]["mean"]))
  if "prune" in results:
    p = _settings(results["prune"]["prune"])
    ks = [k for k in results["prune"]["prune"]["ks"] if k != depth] + [depth]
    curve = lambda v, kind: [p[v][f"k{k}_{kind}"]["top1"]["mean"] * 100 for k in ks]
    ls_arb = curve("layershuffle", "arbitrary")
    out.append(Claim("Pruning degrades LayerShuffle gracefully: arbitrary-order accuracy rises with "
                     "the number of layers kept.", "LS arbitrary top-1 non-decreasing in k",
                     ", ".join(f"k={k}: {a:.1f}" for k, a in zip(ks, ls_arb)),
                     all(b >= a - 0.5 for a, b in zip(ls_arb, ls_arb[1:]))))
    ld_arb = curve("layerdrop", "arbitrary")
    out.append(Claim("In arbitrary order only LayerShuffle succeeds; LayerDrop fails at every depth.",
                     "LayerDrop arbitrary < LS arbitrary at every k",
                     ", ".join(f"k={k}: {d:.1f} vs {a:.1f}" for k, d, a in zip(ks, ld_arb, ls_arb)),
                     all(d < a for d, a in zip(ld_arb, ls_arb))))
    k0 = ks[0]
    ls3, ld3 = p["layershuffle"][f"k{k0}_sequential"]["top1"]["mean"] * 100, \
        p["layerdrop"][f"k{k0}_sequential"]["top1"]["mean"] * 100
    out.append(Claim(f"With few layers ({k0}) kept in the original order LayerShuffle beats LayerDrop "
                     f"(paper, 3 layers: ~{PAPER_FIG1_3LAYERS['layershuffle']} % vs "
                     f"~{PAPER_FIG1_3LAYERS['layerdrop']} %).", f"LS > LayerDrop at k={k0}, sequential",
                     f"{ls3:.1f} vs {ld3:.1f}", ls3 > ld3))
    kept = [k for k in ks if f"baseline keep {k}" in p]
    if kept:
      rows, ok = [], True
      for k in kept[:2]:
        r = p[f"baseline keep {k}"][f"k{k}_sequential"]["top1"]["mean"] * 100
        best = max(p[v][f"k{k}_sequential"]["top1"]["mean"] * 100 for v in ("layershuffle", "layerdrop"))
        rows.append(f"k={k}: {r:.1f} vs {best:.1f}")
        ok &= r > best
      out.append(Claim("Models refined at reduced depth beat pruned LS/LayerDrop models at few layers.",
                       "refined-at-k > best of LS, LayerDrop at k (sequential), for the smallest k",
                       ", ".join(rows), ok))
  if "analysis" in results:
    a = results["analysis"]["analysis"]
    by = {_variant(r["setting"]): r for r in a["runs"]}
    if "layershuffle" in by and "baseline" in by:
      rho = {v: by[v]["contribution_distance_spearman"] for v in ("baseline", "layershuffle")}
      out.append(Claim("A LayerShuffle layer contributes less the further it runs from its original "
                       "position; a baseline layer's contribution does not depend on it (Fig. 4c/d).",
                       "Spearman rho(|position - original|, contribution) of LS < baseline's - 0.2",
                       f"LS {rho['layershuffle']:+.2f}, baseline {rho['baseline']:+.2f}",
                       rho["layershuffle"] < rho["baseline"] - 0.2,
                       "Contributions hardly depend on the distance from the original position in "
                       "either model here (see the ridge plots); the paper read this effect off a "
                       "ViT-B/16 whose layers are far more specialised than these 64-wide ones."))
      knn = {v: by[v]["position_knn_accuracy"] for v in ("baseline", "layershuffle")}
      out.append(Claim("A LayerShuffle layer's output occupies different regions depending on its "
                       "position; the baseline's shows no clear ordering (Fig. 4a/b).",
                       "position decodable from the 2-D UMAP (10-NN, 5-fold) better for LS than baseline",
                       f"LS {100 * knn['layershuffle']:.1f} %, baseline {100 * knn['baseline']:.1f} % "
                       f"(chance {100 / depth:.1f} %)", knn["layershuffle"] > knn["baseline"]))
  return out


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
      "Each row is decided by the rule shown, computed from the numbers below.",
      "",
      "| paper's claim | rule | ours | reproduces |",
      "|---|---|---|---|",
  ]
  for c in cl:
    lines.append(f"| {c.text} | {c.rule} | {c.ours} | {'yes' if c.holds else '**no**'} |")
  n_yes = sum(c.holds for c in cl)
  lines += ["", f"{n_yes} of {len(cl)} claims hold at this scale."]
  failed = [c for c in cl if not c.holds and c.why]
  if failed:
    lines += ["", "Where a claim does not hold, a likely reason (a hypothesis, not a measurement):", ""]
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
