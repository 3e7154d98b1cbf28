"""Figures: pruning curves (Fig. 1b/1c), UMAP of a layer's output and class-token
contribution ridge plots (Fig. 4). Headless (Agg)."""
from __future__ import annotations

import os

import numpy as np


def _figure(**kw):
  """A figure outside pyplot: no global backend switch (notebooks keep theirs), no leaks."""
  from matplotlib.figure import Figure
  return Figure(**kw)


def prune_plot(result: dict, path: str) -> str:
  """Top-1 vs layers kept, one line per setting, sequential and arbitrary panels."""
  fig = _figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2, sharey=True)
  for ax, kind in zip(axes, ("sequential", "arbitrary")):
    for name, s in sorted(result["settings"].items()):
      ks = sorted(int(k[1:].split("_")[0]) for k in s if k.endswith("_" + kind))
      if not ks:
        continue
      m = np.array([s[f"k{k}_{kind}"]["top1"]["mean"] for k in ks]) * 100
      sd = np.array([s[f"k{k}_{kind}"]["top1"]["std"] for k in ks]) * 100
      style = "o" if len(ks) == 1 else "o-"
      ax.errorbar(ks, m, yerr=sd, fmt=style, capsize=3, label=name)
    ax.set_title(f"{kind} order")
    ax.set_xlabel("layers kept")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("top-1 accuracy (%)")
  axes[1].legend(fontsize=8)
  fig.suptitle(f"pruning (kept subsets: {result['method']}, mean ± std over runs)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


def umap_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
  import warnings
  import umap
  warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
  n = len(features)
  reducer = umap.UMAP(n_neighbors=min(15, n - 1), random_state=seed, n_components=2)
  return reducer.fit_transform(np.asarray(features, np.float32))


def umap_panels(results, layer: int, path: str) -> str:
  fig = _figure(figsize=(6 * len(results), 4.6))
  axes = fig.subplots(1, len(results), squeeze=False)
  for ax, r in zip(axes[0], results):
    depth = len(r["contributions"])
    sc = ax.scatter(r["embedding"][:, 0], r["embedding"][:, 1], c=r["positions"], cmap="viridis",
                    vmin=0, vmax=depth - 1, s=8)
    ax.set_title(f"{r['setting']}: layer {layer}'s output\n({r['name']})", fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(sc, ax=ax, label="position (dark = near input)")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


def ridge_panels(results, path: str) -> str:
  """One ridge per layer (original order, top to bottom), a histogram per position
  (colour), of the contribution norm normalised by that layer's largest one
  (``results[i]['normalised'][layer][position]``, from ``evaluators.per_layer_normalised``)."""
  import matplotlib
  cmap = matplotlib.colormaps["viridis"]
  depth = len(results[0]["normalised"])
  fig = _figure(figsize=(5.5 * len(results), 0.55 * depth + 1.5))
  axes = fig.subplots(1, len(results), squeeze=False)
  for ax, r in zip(axes[0], results):
    bins = np.linspace(0, 1, 41)
    for l in range(depth):
      base = depth - 1 - l
      for p, vals in enumerate(r["normalised"][l]):
        if len(vals) < 2:
          continue
        h, edges = np.histogram(vals, bins=bins, density=True)
        h = 0.9 * h / max(h.max(), 1e-9)
        ax.fill_between(edges[:-1], base, base + h, step="post", alpha=0.35,
                        color=cmap(p / max(depth - 1, 1)), linewidth=0)
      ax.axhline(base, color="k", lw=0.3)
    ax.set_yticks(range(depth))
    ax.set_yticklabels([f"layer {depth - 1 - i}" for i in range(depth)], fontsize=7)
    ax.set_xlabel("||cls out - cls in||, normalised per layer")
    ax.set_title(f"{r['setting']}: contribution to the class token\n({r['name']})", fontsize=9)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
