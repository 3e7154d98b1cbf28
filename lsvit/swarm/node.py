"""A layer-node: one process (a Ray actor) holding some encoder layers, running one of them
on the activations a router sends. Every layer of a node shares one compiled program per
input shape (the layer's weights and position are arguments)."""
from __future__ import annotations

import os
import socket
import time
from typing import Dict, Optional, Sequence

import numpy as np

from lsvit.swarm import parts


class LayerNode:
  """``layers``: {(run, layer): parameters}, or None with ``source`` + ``indices`` to load them
  from a workdir or converted checkpoint here (a node joining from another host); ``run``
  then names the run index they take in the swarm."""

  def __init__(self, node_id: str, spec: Optional[dict] = None,
               layers: Optional[Dict[tuple, dict]] = None, source: Optional[str] = None,
               indices: Sequence[int] = (), run: int = 0, delay: float = 0.0):
    import jax
    if layers is None:
      m = parts.load([source])
      spec = m.spec
      layers = {(run, int(l)): m.layer_params(0, int(l)) for l in indices}
    self.id, self.spec, self.delay = node_id, dict(spec), float(delay)
    self.layers = {tuple(k): jax.tree.map(jax.numpy.asarray, v) for k, v in layers.items()}
    self.digests = {k: parts.digest(v) for k, v in layers.items()}
    block = parts.block_for(self.spec)
    from lsvit import model as model_lib
    self._fn = jax.jit(lambda p, x, pos, emb: model_lib.run_layer(block, p, x, pos, emb)[0])
    self.pid, self.host = os.getpid(), socket.gethostname()

  def info(self) -> dict:
    return {"id": self.id, "pid": self.pid, "host": self.host, "spec": self.spec,
            "layers": sorted(self.layers), "digests": self.digests}

  def ping(self) -> int:
    return self.pid

  def set_delay(self, seconds: float):
    """Chaos: wait ``seconds`` before answering each hop (a slow or far-away device)."""
    self.delay = float(seconds)

  def run(self, run: int, layer: int, x: bytes, shape, position: int, emb=None):
    """(the layer's output, its compute seconds). Activations travel as float32 bytes of
    ``shape`` [B, tokens, width]: Ray moves bytes faster than numpy arrays (BENCHMARKS.md)."""
    key = (int(run), int(layer))
    if key not in self.layers:
      raise KeyError(f"node {self.id} holds no layer {key} (it holds {sorted(self.layers)})")
    start = time.perf_counter()
    x = np.frombuffer(x, np.float32).reshape(shape)
    y = np.asarray(self._fn(self.layers[key], x, np.int32(position), emb), np.float32)
    compute = time.perf_counter() - start
    if self.delay > 0:
      time.sleep(self.delay)
    return y.tobytes(), compute
