"""Swarm inference on Ray: a LayerShuffle model served by layer-nodes that may die, stall or
join, each request taking a fresh random order through whichever layers are alive.

    from lsvit.swarm import Swarm
    with Swarm(["runs/digits_layershuffle_seed0"], nodes=4) as s:
      r = s.classify(images)       # r.logits [B, classes], r.route [(run, layer), ...]
      s.nodes()                    # id, layers, pid, host, state of every node

The client (this process) holds the embedding and the head; nodes (Ray actors, one process
each) hold the encoder layers; ``router.Router`` decides the route and what to do on failure.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import warnings
from typing import List, Optional, Sequence

import numpy as np

from lsvit import order as order_lib
from lsvit.swarm import parts
from lsvit.swarm.router import (ALIVE, JOINING, Hop, HopFailed, HopTimeout, Node, NodeDead,
                                NoLayersAlive, Result, Router, SwarmError, Transport)

__all__ = ["Swarm", "SwarmError", "NoLayersAlive", "Result", "Hop", "start_ray"]

NODE_PREFIX = "lsvit-node-"


def _import_ray(local: bool):
  """Ray, imported so that a swarm on one machine stays on loopback: Ray resolves
  127.0.0.1 to the host's address unless its cluster mode is off before it is imported."""
  os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
  if local:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
  elif os.path.exists(os.path.expanduser("~/.ray/auth_token")) or "RAY_AUTH_TOKEN" in os.environ:
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # `ray start` turns token auth on
  import ray
  return ray


def _check_reachable(address: str, timeout: float = 5.0):
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise SwarmError(f"--address {address!r}: give HOST:PORT of a Ray head "
                     f"(started there with `ray start --head --port=6379`)")
  try:
    socket.create_connection((host, int(port)), timeout=timeout).close()
  except OSError as e:
    raise SwarmError(f"cannot reach a Ray head at {address} ({e.strerror or e}); start one "
                     f"there with `ray start --head --port={port}`, or leave --address out to "
                     f"run on this machine") from None


def start_ray(address: Optional[str] = None, namespace: str = "lsvit", cpus: Optional[int] = None):
  """Connects to the Ray cluster at ``address``, or starts a local Ray bound to 127.0.0.1.
  Returns (ray, whether this call started it)."""
  ray = _import_ray(local=address is None)
  if ray.is_initialized():
    return ray, False
  if address is not None:
    _check_reachable(address)
    try:
      ray.init(address=address, namespace=namespace, log_to_driver=False,
               logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError) as e:
      cause = str(e.__cause__ or e).strip().splitlines()[0][:300]
      raise SwarmError(f"cannot join the Ray cluster at {address}: {cause} (a cluster started "
                       f"with token auth needs its ~/.ray/auth_token on this host)") from None
    return ray, True
  with warnings.catch_warnings():  # JAX warns of any fork; Ray's forks exec at once
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
    ray.init(num_cpus=cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
             namespace=namespace, log_to_driver=False, logging_level=logging.ERROR)
  ip = ray.util.get_node_ip_address()
  if ip != "127.0.0.1":
    ray.shutdown()
    raise SwarmError(f"Ray bound to {ip}, not loopback: it was imported before lsvit.swarm "
                     f"with cluster mode on; set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before "
                     f"importing ray, or pass an address of a cluster")
  return ray, True


class RayTransport(Transport):
  def __init__(self, ray):
    self.ray = ray
    self.handles = {}

  def _dead(self, e) -> bool:
    return isinstance(e, (self.ray.exceptions.ActorDiedError, self.ray.exceptions.RayActorError)) \
        and not isinstance(e, self.ray.exceptions.ActorUnavailableError)

  def call(self, node, layer, x, position, emb, timeout):
    x = np.ascontiguousarray(x, np.float32)
    ref = self.handles[node].run.remote(layer[0], layer[1], x.tobytes(), x.shape, position, emb)
    try:
      y, compute = self.ray.get(ref, timeout=timeout)
      return np.frombuffer(y, np.float32).reshape(x.shape), compute
    except self.ray.exceptions.GetTimeoutError:
      try:
        self.ray.cancel(ref)  # a stalled node should not work through a queue of stale hops
      except Exception:  # noqa: BLE001 - best effort; the answer is discarded anyway
        pass
      raise HopTimeout(node) from None
    except Exception as e:  # noqa: BLE001 - every failure is one of three kinds to the router
      if self._dead(e):
        raise NodeDead(node) from None
      raise HopFailed(f"{node}: {e}") from None

  def ping(self, nodes, timeout):
    refs = {n: self.handles[n].ping.remote() for n in nodes}
    ready, _ = self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    ready = set(ready)
    out = {}
    for n, ref in refs.items():
      if ref not in ready:
        out[n] = "timeout"
        continue
      try:
        self.ray.get(ref)
        out[n] = "ok"
      except Exception as e:  # noqa: BLE001
        out[n] = "dead" if self._dead(e) else "timeout"
    return out


def assign(layers: Sequence[tuple], nodes: int, replicas: int) -> List[List[tuple]]:
  """Layers dealt to ``nodes`` nodes, ``replicas`` copies each, no node holding a layer twice."""
  if nodes < 1:
    raise SwarmError(f"nodes={nodes}: a swarm needs at least one node")
  if not 1 <= replicas <= nodes:
    raise SwarmError(f"replicas={replicas}: choose 1 to {nodes} (one copy per node at most)")
  if nodes > len(layers) * replicas:
    raise SwarmError(f"{nodes} nodes but only {len(layers) * replicas} layer copies "
                     f"({len(layers)} layers x {replicas} replicas): use fewer nodes or more "
                     f"replicas")
  out = [[] for _ in range(nodes)]
  layers = sorted(layers, key=lambda rl: (rl[1], rl[0]))  # runs' copies of a slot: other nodes
  for rep in range(replicas):
    for i, layer in enumerate(layers):
      out[(i + rep * max(1, nodes // replicas)) % nodes].append(layer)
  return out


class Swarm:
  """A LayerShuffle model served by ``nodes`` layer-nodes (Ray actors).

  workdirs: training workdirs or converted checkpoints (or a loaded ``parts.SwarmModel``);
  several runs make a merged swarm (a request may take each layer from any run; embedding and
  head from run ``base``).
  replicas: copies of every layer (on different nodes). k: layers per request (default all
  alive). hop_timeout: seconds per hop, or None (adaptive, ``router.Router``).
  heartbeat: seconds between liveness checks and discovery of nodes that joined by name.
  address: a Ray cluster (HOST:PORT); None starts Ray on this machine, on loopback.
  """

  def __init__(self, workdirs: Sequence[str], nodes: int = 4, *, replicas: int = 1,
               k: Optional[int] = None, hop_timeout: Optional[float] = None,
               heartbeat: float = 1.0, address: Optional[str] = None, name: str = "lsvit",
               base: int = 0, seed: int = 0, node_cpus: float = 0.0, retries: int = 2,
               ban_base: float = 1.0, ban_max: float = 30.0, ready_timeout: float = 300.0):
    # a bad workdir is an error before Ray starts
    self.model = workdirs if isinstance(workdirs, parts.SwarmModel) else parts.load(workdirs, base)
    plan = assign(self.model.layers(), nodes, replicas)
    self._cluster = address is not None  # nodes spread over the cluster's hosts
    self.ray, self._started_ray = start_ray(address, f"lsvit-swarm-{name}")
    try:
      self._setup(plan, k, hop_timeout, heartbeat, name, seed, node_cpus, retries, ban_base,
                  ban_max, ready_timeout)
    except BaseException:
      self.close()
      raise

  def _setup(self, plan, k, hop_timeout, heartbeat, name, seed, node_cpus, retries, ban_base,
             ban_max, ready_timeout):
    import jax
    from lsvit import model as model_lib
    self.k, self.heartbeat_s, self.seed = k, heartbeat, seed
    self.node_cpus, self.ready_timeout = node_cpus, ready_timeout
    self.namespace = f"lsvit-swarm-{name}"
    self._digests = self.model.digests()
    self._rng = np.random.default_rng(seed)
    self._rng_lock = threading.Lock()
    self._count = 0
    vit = self.model.model
    base_params = jax.tree.map(jax.numpy.asarray, self.model.params[self.model.base])
    self._embed = jax.jit(lambda x: vit.apply({"params": base_params}, x,
                                              method=model_lib.ViT.embed))
    self._head = jax.jit(lambda x: vit.apply({"params": base_params}, x,
                                             method=model_lib.ViT.classify))
    self._check_images = vit.check_images
    self._warm_shape = (1, vit.num_tokens, vit.width)
    table = self.model.pos_table()
    self._emb_for = None if table is None else (lambda position: table[position])
    self.transport = RayTransport(self.ray)
    self.router = Router(self.transport, hop_timeout=hop_timeout, retries=retries,
                         ban_base=ban_base, ban_max=ban_max)
    self._actor_cls = self.ray.remote(max_restarts=0)(_node_class())
    self._next_id = 0
    self._id_lock = threading.Lock()
    self._owned = set()  # nodes this swarm started (the ones close() ends)
    self._stop = threading.Event()
    self._thread = None
    self._start_nodes(plan)
    self._thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                    name="lsvit-swarm-heartbeat")
    self._thread.start()

  # ------------------------------------------------------------------------------- nodes

  def _start_nodes(self, plan, delay: float = 0.0) -> List[str]:
    pending = []
    for layers in plan:
      with self._id_lock:
        node_id = f"{NODE_PREFIX}{self._next_id}"
        self._next_id += 1
      handle = self._actor_cls.options(
          name=node_id, namespace=self.namespace, num_cpus=self.node_cpus,
          scheduling_strategy="SPREAD" if self._cluster else "DEFAULT").remote(
          node_id, self.model.spec,
          {l: self.model.layer_params(*l) for l in layers}, delay=delay)
      self.transport.handles[node_id] = handle
      self._owned.add(node_id)
      pending.append((node_id, handle, handle.info.remote()))
    ids = []
    for node_id, handle, ref in pending:
      self._admit(node_id, self._wait(node_id, ref), handle)
      ids.append(node_id)
    return ids

  def _warm(self, node_id, handle, info):
    """Compiles a node's program for one image before it serves (its layers share it), so a
    request does not wait for a compilation."""
    run, layer = info["layers"][0]
    x = np.zeros(self._warm_shape, np.float32)
    self._wait(node_id, handle.run.remote(run, layer, x.tobytes(), x.shape, 0,
                                               self._emb_for(0) if self._emb_for else None))

  def _wait(self, node_id, ref) -> dict:
    ready, _ = self.ray.wait([ref], timeout=self.ready_timeout)
    if not ready:
      raise SwarmError(f"node {node_id} did not start within {self.ready_timeout:.0f} s")
    try:
      return self.ray.get(ref)
    except Exception as e:  # noqa: BLE001 - the node's own error, in one line
      raise SwarmError(f"node {node_id} failed to start: {str(e).strip().splitlines()[-1]}")

  def _admit(self, node_id: str, info: dict, handle, state: str = ALIVE):
    """Checks a node's model and weights against the swarm's, compiles its program, then routes
    to it."""
    parts.check_spec(self.model.spec, info["spec"], f"node {node_id}")
    for layer, d in info["digests"].items():
      layer = tuple(layer)
      if layer not in self._digests:
        raise SwarmError(f"node {node_id} holds layer {layer}, which this swarm does not have "
                         f"(runs 0..{len(self.model.sources) - 1}, "
                         f"layers 0..{self.model.depth - 1})")
      if d != self._digests[layer]:
        raise SwarmError(f"node {node_id} holds layer {layer[1]} of run {layer[0]} with other "
                         f"weights than {self.model.sources[layer[0]]} (checkpoint mismatch): "
                         f"load it from the same checkpoint")
    if handle is not None:
      self._warm(node_id, handle, info)
    self.router.add(Node(node_id, tuple(tuple(l) for l in info["layers"]), info["pid"],
                         info["host"], state, shapes={self._warm_shape}))

  def add_nodes(self, count: int = 1, layers: Optional[Sequence[Sequence[tuple]]] = None,
                delay: float = 0.0) -> List[str]:
    """Starts ``count`` nodes (or one per entry of ``layers``) and routes to them once they are
    ready. By default each takes copies of the layers with the fewest usable copies."""
    if layers is None:
      per_node = math.ceil(len(self._digests) / max(1, len(self.router.nodes())))
      live = {}
      for slot, cands in self.router.live_slots().items():
        for _, layer in cands:
          live[layer] = live.get(layer, 0) + 1
      plan = []
      for _ in range(count):
        order = sorted(self._digests, key=lambda l: (live.get(l, 0), self._rng.random()))
        plan.append(order[:per_node])
        for l in plan[-1]:
          live[l] = live.get(l, 0) + 1
    else:
      plan = [[tuple(l) for l in ls] for ls in layers]
    return self._start_nodes(plan, delay)

  def remove_node(self, node_id: str):
    """Takes a node out of the routing and ends its process."""
    self.router.remove(node_id)
    handle = self.transport.handles.get(node_id)
    if handle is not None:
      self.ray.kill(handle)

  def set_delay(self, node_id: str, seconds: float):
    """Chaos: the node waits ``seconds`` before answering each hop (a slow device)."""
    self.ray.get(self.transport.handles[node_id].set_delay.remote(seconds))

  def nodes(self) -> List[dict]:
    """Every node: id, layers [(run, layer)], pid, host, state, hops served and failed."""
    return [n.row() for n in self.router.nodes()]

  def _discover(self):
    """Nodes started elsewhere (``python -m lsvit.swarm join``) under this swarm's name."""
    known = {n.id for n in self.router.nodes()} | set(self.transport.handles)
    for entry in self.ray.util.list_named_actors(all_namespaces=True):
      name = entry["name"] if isinstance(entry, dict) else entry
      ns = entry.get("namespace") if isinstance(entry, dict) else self.namespace
      if ns != self.namespace or not name.startswith(NODE_PREFIX) or name in known:
        continue
      handle = self.ray.get_actor(name, namespace=self.namespace)
      self.transport.handles[name] = handle
      try:
        self._admit(name, self._wait(name, handle.info.remote()), handle, JOINING)
      except SwarmError as e:
        logging.getLogger("lsvit.swarm").warning("refused: %s", e)
        self.transport.handles.pop(name, None)

  def _heartbeat_loop(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        self._discover()
        self.router.heartbeat(timeout=min(1.0, self.heartbeat_s))
      except Exception as e:  # noqa: BLE001 - keep beating; say what went wrong
        logging.getLogger("lsvit.swarm").warning("heartbeat: %s", e)

  # ------------------------------------------------------------------------------- requests

  def classify(self, images, *, k: Optional[int] = None, order: Optional[Sequence[int]] = None,
               route: Optional[Sequence[tuple]] = None) -> Result:
    """Logits [B, classes] of preprocessed NHWC float images, through a fresh random order over
    the live layers (``k`` of them), or slot ``order``, or exactly ``route`` ((run, layer)).
    Raises NoLayersAlive when no layer can be reached."""
    images = np.asarray(images)
    self._check_images(images)
    k = k if k is not None else self.k
    if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
      raise SwarmError(f"k={k!r}: give the number of layers a request runs through (>= 1)")
    if order is not None:
      order = order_lib.check_order(order, self.model.depth).tolist()
    if route is not None:
      for run, layer in route:
        if (run, layer) not in self._digests:
          raise SwarmError(f"route names ({run}, {layer}), not a layer of this swarm")
    with self._rng_lock:
      self._count += 1
      rng = np.random.default_rng([self.seed, self._count])
    start = time.perf_counter()
    x = np.asarray(self._embed(images))
    x, done, skipped, hops = self.router.run(x, rng, order=order, route=route, k=k,
                                             emb_for=self._emb_for)
    if not done:
      raise NoLayersAlive(f"no layer could be reached for this request ({len(hops)} attempts "
                          f"failed, {len(skipped)} layers skipped)")
    logits = np.asarray(self._head(x))
    return Result(logits, done, skipped, hops, time.perf_counter() - start)

  # ------------------------------------------------------------------------------- lifetime

  def close(self):
    """Ends the heartbeat, this swarm's node processes and, if it started it, Ray."""
    stop, thread = getattr(self, "_stop", None), getattr(self, "_thread", None)
    if stop is not None:
      stop.set()
    if thread is not None:
      thread.join(timeout=5)
    transport = getattr(self, "transport", None)
    for node_id in sorted(getattr(self, "_owned", ())):
      try:
        self.ray.kill(transport.handles[node_id])
      except Exception:  # noqa: BLE001 - already gone
        pass
    self._owned = set()
    if self._started_ray and self.ray.is_initialized():
      self.ray.shutdown()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _node_class():
  from lsvit.swarm.node import LayerNode
  return LayerNode
