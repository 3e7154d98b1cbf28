"""A model in pieces: the client's ends (embedding, final norm, heads) and the layers that
nodes hold, each named by (run, layer) and fingerprinted so a node with other weights is
refused. Layers of several runs make a merged model, as ``evaluators.merge_params`` builds
one: every layer from its own run, everything outside the blocks from run ``base``."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Dict, List, Sequence

import jax
import numpy as np

from lsvit import checkpoint as ckpt_lib
from lsvit import evaluators
from lsvit import model as model_lib
from lsvit.swarm.router import SwarmError

# What a layer's computation depends on: nodes and swarm must agree on all of them.
SPEC_FIELDS = ("width", "num_heads", "mlp_dim", "depth", "variant", "pos_dim", "pos_table",
               "ln_eps", "dtype")


def spec_of(model_cfg: dict) -> dict:
  m = model_lib.build(model_cfg)
  return {f: np.dtype(m.dtype).name if f == "dtype" else getattr(m, f) for f in SPEC_FIELDS}


def check_spec(swarm: dict, node: dict, who: str):
  """Raises SwarmError naming every field in which ``node``'s layers differ from the swarm."""
  diff = [f for f in SPEC_FIELDS if swarm.get(f) != node.get(f)]
  if diff:
    have = ", ".join(f"{f}={node.get(f)!r}" for f in diff)
    want = ", ".join(f"{f}={swarm.get(f)!r}" for f in diff)
    raise SwarmError(f"{who} holds layers of another model ({have}); this swarm's model has "
                     f"{want}: a node can only join a swarm of the same width, heads and variant")


def block_for(spec: dict) -> model_lib.Block:
  cfg = {f: v for f, v in spec.items() if f != "dtype"}
  return model_lib.build(dict(cfg, dtype=spec["dtype"])).block()


def digest(layer_params) -> str:
  """SHA-256 over a layer's parameter names, shapes, dtypes and bytes."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(layer_params)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def layer_of(params, layer: int):
  return jax.tree.map(lambda a: np.asarray(a[layer]), params["Transformer"]["encoderblock"])


@dataclasses.dataclass
class SwarmModel:
  """The runs a swarm serves. ``base``: the run whose embedding, tokens, position table, final
  norm and heads the client uses."""
  sources: List[str]
  model_cfgs: List[dict]
  params: List[Any]
  base: int = 0

  @functools.cached_property
  def spec(self) -> dict:
    return spec_of(self.model_cfgs[self.base])

  @property
  def depth(self) -> int:
    return self.spec["depth"]

  @property
  def model(self) -> model_lib.ViT:
    return model_lib.build(self.model_cfgs[self.base])

  def layers(self) -> List[tuple]:
    return [(r, l) for r in range(len(self.sources)) for l in range(self.depth)]

  def layer_params(self, run: int, layer: int):
    return layer_of(self.params[run], layer)

  def digests(self) -> Dict[tuple, str]:
    return {(r, l): digest(self.layer_params(r, l)) for r, l in self.layers()}

  def pos_table(self):
    """LayerShuffle-position's shared table (the base run's), or None."""
    enc = self.params[self.base]["Transformer"]
    return np.asarray(enc["layer_pos_embedding"]) if "layer_pos_embedding" in enc else None

  def merged_params(self, route: Sequence[tuple]):
    """Parameters of the one model that runs ``route`` ((run, layer) pairs) in the order
    ``[layer for _, layer in route]``: ``evaluators.merge_params`` with slot l from its run."""
    sources = np.full(self.depth, self.base, np.int32)
    for run, layer in route:
      sources[layer] = run
    return evaluators.merge_params(self._stacked, sources, self.base)

  @functools.cached_property
  def _stacked(self):  # the runs stacked once, not per merged model
    return evaluators.stack_params(self.params)

  def one_process(self):
    """``apply(params, images, order) -> logits``: the model in one process (jitted), the
    reference the swarm's answers are checked and timed against."""
    vit = model_lib.build(dict(self.model_cfgs[self.base], impl="gather"))
    return jax.jit(lambda p, x, order: vit.apply({"params": p}, x, order=order)["logits"])


def load(sources: Sequence[str], base: int = 0) -> SwarmModel:
  """Training workdirs (their best checkpoint) or converted checkpoints, verified on restore.
  Runs must share the layers' computation (``SPEC_FIELDS``)."""
  if not sources:
    raise SwarmError("no workdir given: pass training workdirs or converted checkpoints")
  if not 0 <= base < len(sources):
    raise SwarmError(f"base={base}: give the index of one of the {len(sources)} runs")
  cfgs, params = [], []
  for src in evaluators.expand_workdirs(sources):
    try:
      p, cfg = ckpt_lib.load_params(src)
    except FileNotFoundError:
      raise SwarmError(f"workdir {src} does not exist: pass a training workdir (made by "
                       f"train.py) or a converted checkpoint (python -m lsvit.convert)") from None
    cfgs.append(cfg)
    params.append(jax.tree.map(np.asarray, p))
  m = SwarmModel(list(evaluators.expand_workdirs(sources)), cfgs, params, base)
  for i, cfg in enumerate(cfgs):
    check_spec(m.spec, spec_of(cfg), f"{m.sources[i]}")
  return m
