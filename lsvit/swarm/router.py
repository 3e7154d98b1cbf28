"""The swarm's router: which nodes are alive, which order a request takes, what happens when
a hop fails. No Ray and no JAX here: it talks to nodes through a ``Transport`` (Ray actors in
``lsvit.swarm``, an in-process fake in the tests), so every rule below is tested quickly.

Rules (after Petals' client): a request draws a fresh random order over the layer slots that
have a usable node (or ``k`` of them); each hop has a deadline; a failed or late hop is retried
on another node holding that slot (the same run's copy first), else the slot is skipped (a
LayerShuffle model tolerates it); a late node is banned for ``ban_base * 2**(failures-1)``
seconds (at most ``ban_max``), a dead one for good; a node that answers again is used again.
Every request gets exactly one answer: a result, or ``NoLayersAlive``.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

Layer = Tuple[int, int]  # (run index, layer index)

JOINING, ALIVE, BANNED, DEAD, LEFT = "joining", "alive", "banned", "dead", "left"


class SwarmError(RuntimeError):
  """A request or a swarm that cannot be served as asked; the message says why."""


class NoLayersAlive(SwarmError):
  pass


class HopTimeout(Exception):
  """The node did not answer within the hop's deadline."""


class NodeDead(Exception):
  """The node's process is gone."""


class HopFailed(Exception):
  """The node answered with an error."""


class Transport:
  """How the router reaches nodes. ``call`` returns (activations, the node's compute seconds)
  or raises HopTimeout / NodeDead / HopFailed; ``ping`` returns {node: 'ok'|'timeout'|'dead'}."""

  def call(self, node: str, layer: Layer, x, position: int, emb, timeout: float):
    raise NotImplementedError

  def ping(self, nodes: Sequence[str], timeout: float) -> Dict[str, str]:
    raise NotImplementedError


@dataclasses.dataclass
class Node:
  id: str
  layers: Tuple[Layer, ...]
  pid: Optional[int] = None
  host: Optional[str] = None
  state: str = JOINING
  failures: int = 0            # consecutive; reset by a success
  banned_until: float = 0.0
  served: int = 0              # hops answered in time
  failed: int = 0              # hops that timed out or failed
  shapes: set = dataclasses.field(default_factory=set)  # input shapes it has compiled for
  typical: float = 0.0         # moving average of its time per hop (s), 0 before any
  inflight: int = 0            # hops sent to it and not answered yet

  def usable(self, now: float) -> bool:
    return self.state == ALIVE or (self.state == BANNED and now >= self.banned_until)

  def row(self) -> dict:
    return {"id": self.id, "layers": [list(l) for l in self.layers], "pid": self.pid,
            "host": self.host, "state": self.state, "served": self.served, "failed": self.failed,
            "failures": self.failures}


@dataclasses.dataclass
class Hop:
  """One attempt: where, and how it went (``outcome`` ok | timeout | dead | error)."""
  position: int          # the position the layer ran (or would have run) at
  layer: Layer
  node: str
  outcome: str
  seconds: float         # round trip seen by the router
  compute: float = 0.0   # the layer's own compute, measured on the node


@dataclasses.dataclass
class Result:
  logits: np.ndarray
  route: List[Layer]     # the layers that ran, in execution order
  skipped: List[Layer]   # slots drawn for this request that no node could serve in time
  hops: List[Hop]        # every attempt, failed ones too
  seconds: float = 0.0


class Router:
  """Routes activations through the swarm's nodes (thread-safe: requests may run concurrently).

  hop_timeout: seconds, or None for adaptive: ``timeout_factor`` x the median over nodes of
  each node's typical time per hop (a moving average of round trips divided by 1 + the hops
  queued before it there; a late hop counts as its deadline) x (1 + the hops queued ahead of
  this one), at least ``min_timeout``: a node busy with other requests gets longer, a load that
  slows every node raises the deadline, one slow node does not. A node's first hop at a new
  input shape (it compiles) gets ``first_timeout``.
  """

  def __init__(self, transport: Transport, *, hop_timeout: Optional[float] = None,
               timeout_factor: float = 5.0, min_timeout: float = 0.02,
               first_timeout: float = 30.0, retries: int = 2, ban_base: float = 1.0,
               ban_max: float = 60.0, clock: Callable[[], float] = time.monotonic):
    self.transport = transport
    self.hop_timeout, self.timeout_factor = hop_timeout, timeout_factor
    self.min_timeout, self.first_timeout = min_timeout, first_timeout
    self.retries, self.ban_base, self.ban_max = retries, ban_base, ban_max
    self.clock = clock
    self._nodes: Dict[str, Node] = {}
    self._lock = threading.Lock()
    self.average = 0.1  # weight of the newest round trip in a node's moving average
    self.events: List[dict] = []                  # state changes, for logs and plots

  # --------------------------------------------------------------------------- membership

  def add(self, node: Node):
    with self._lock:
      if node.id in self._nodes and self._nodes[node.id].state not in (DEAD, LEFT):
        raise SwarmError(f"node {node.id} is already in the swarm")
      self._nodes[node.id] = node
      self._event(node, node.state)

  def remove(self, node_id: str):
    with self._lock:
      self._get(node_id).state = LEFT
      self._event(self._nodes[node_id], LEFT)

  def nodes(self) -> List[Node]:
    with self._lock:
      return [dataclasses.replace(n, shapes=set(n.shapes)) for n in self._nodes.values()]

  def node(self, node_id: str) -> Node:
    with self._lock:
      return self._get(node_id)

  def _get(self, node_id):
    if node_id not in self._nodes:
      raise SwarmError(f"no node {node_id!r} in the swarm (nodes: {sorted(self._nodes)})")
    return self._nodes[node_id]

  def _event(self, node: Node, what: str):
    self.events.append({"t": self.clock(), "node": node.id, "event": what})

  def heartbeat(self, timeout: float = 1.0):
    """Pings every node not known dead: a joining or returning node that answers becomes
    alive (a banned one when its ban ends), one that does not is banned, a dead one is dropped."""
    with self._lock:
      ids = [n.id for n in self._nodes.values() if n.state not in (DEAD, LEFT)]
    answers = self.transport.ping(ids, timeout) if ids else {}
    with self._lock:
      now = self.clock()
      for node_id, answer in answers.items():
        n = self._nodes[node_id]
        if n.state in (DEAD, LEFT):
          continue
        if answer == "dead":
          self._mark_dead(n)
        elif answer == "ok" and (n.state == JOINING or
                                 (n.state == BANNED and now >= n.banned_until)):
          n.state = ALIVE  # failures are forgotten only by a hop answered in time
          self._event(n, ALIVE)
        elif answer == "timeout" and n.state == ALIVE:
          self._ban(n, now)

  def _mark_dead(self, n: Node):
    if n.state != DEAD:
      n.state = DEAD
      self._event(n, DEAD)

  def _ban(self, n: Node, now: float):
    n.failures += 1
    n.banned_until = now + min(self.ban_max, self.ban_base * 2 ** (n.failures - 1))
    n.state = BANNED
    self._event(n, BANNED)

  # --------------------------------------------------------------------------- routing

  def live_slots(self, banned: bool = False) -> Dict[int, List[Tuple[str, Layer]]]:
    """layer index -> [(node, (run, layer))] that could serve it now (``banned``: also the
    nodes serving a ban, which are late but not known dead)."""
    now = self.clock()
    slots: Dict[int, List[Tuple[str, Layer]]] = {}
    with self._lock:
      for n in self._nodes.values():
        if n.usable(now) or (banned and n.state == BANNED):
          for layer in n.layers:
            slots.setdefault(layer[1], []).append((n.id, layer))
    return slots

  def timeout_for(self, node: Node, shape, queued: int = 0) -> float:
    if shape not in node.shapes:
      return self.first_timeout
    if self.hop_timeout is not None:
      return self.hop_timeout
    typical = self.median_hop()
    if typical == 0:
      return self.first_timeout
    return max(self.min_timeout, self.timeout_factor * typical * (1 + queued))

  def median_hop(self) -> float:
    """The median over usable nodes of their typical hop round trip (0 before any)."""
    now = self.clock()
    with self._lock:
      typical = [n.typical for n in self._nodes.values() if n.typical > 0 and n.usable(now)]
    return float(np.median(typical)) if typical else 0.0

  def draw(self, rng: np.random.Generator, k: Optional[int] = None,
           banned: bool = False) -> List[int]:
    """A fresh random order over the layer slots that have a usable node (``k`` of them); when
    every node is banned (or ``banned``), over theirs too (Petals: late nodes beat none)."""
    slots = sorted(self.live_slots(banned)) or sorted(self.live_slots(banned=True))
    if not slots:
      raise NoLayersAlive("no layer of the model is alive: every node is dead, banned or still "
                          "joining; add nodes (Swarm.add_nodes) or wait for banned ones to return")
    order = [slots[i] for i in rng.permutation(len(slots))]
    return order if k is None else order[:k]

  def run(self, x, rng: np.random.Generator, *, order: Optional[Sequence[int]] = None,
          route: Optional[Sequence[Layer]] = None, k: Optional[int] = None,
          emb_for: Optional[Callable[[int], object]] = None):
    """Passes ``x`` through the swarm: through ``route`` ((run, layer) pairs, exactly those),
    or slot ``order``, or a fresh random order over the live slots. Returns (x, route, skipped,
    hops). ``emb_for(position)`` gives the position embedding sent with each hop (or None)."""
    if route is not None:
      plan = [(layer[1], layer) for layer in route]
    else:
      plan = [(l, None) for l in (order if order is not None else self.draw(rng, k))]
    done, skipped, hops = [], [], []
    fallback = not self.live_slots()  # every node banned: this request tries the banned ones
    x, done, skipped = self._pass(plan, x, rng, fallback, emb_for, hops)
    if not done and not fallback and self.live_slots(banned=True) and route is None:
      # every hop failed while others were banned (a burst of load): the banned nodes are late,
      # not dead, and an answer through them beats none
      plan = [(l, None) for l in self.draw(rng, k, banned=True)]
      x, done, skipped = self._pass(plan, x, rng, True, emb_for, hops)
    return x, done, skipped, hops

  def _pass(self, plan, x, rng, fallback, emb_for, hops):
    done, skipped = [], []
    for slot, wanted in plan:
      position = len(done)
      emb = emb_for(position) if emb_for else None
      tried = None
      for node_id, layer in self._candidates(slot, wanted, rng, fallback):
        node = self.node(node_id)
        if node.state in (DEAD, LEFT) or not (fallback or node.usable(self.clock())):
          continue  # banned (by a concurrent request) or dead since the list was made
        tried = layer
        with self._lock:
          queued = node.inflight
          node.inflight += 1
        timeout = self.timeout_for(node, x.shape, queued)
        start = time.perf_counter()
        outcome, compute = "ok", 0.0
        try:
          y, compute = self.transport.call(node_id, layer, x, position, emb, timeout)
        except HopTimeout:
          outcome = "timeout"
        except NodeDead:
          outcome = "dead"
        except HopFailed:
          outcome = "error"
        seconds = time.perf_counter() - start
        hops.append(Hop(position, layer, node_id, outcome, seconds, compute))
        self._record(node_id, outcome, seconds / (1 + queued), x.shape)
        if outcome == "ok":
          x = y
          done.append(layer)
          break
      else:
        skipped.append(tuple(wanted or tried or self._any_copy(slot)))
    return x, done, skipped

  def _any_copy(self, slot: int) -> Layer:
    with self._lock:
      return min(l for n in self._nodes.values() for l in n.layers if l[1] == slot)

  def _average(self, n: Node, seconds: float):
    n.typical = seconds if n.typical == 0 else (
        (1 - self.average) * n.typical + self.average * seconds)

  def _candidates(self, slot: int, wanted: Optional[Layer], rng, fallback: bool):
    """Nodes to try for ``slot``, in order, at most 1 + retries: a random one first, then the
    other replicas of the same (run, layer), then other runs' copies of the layer (``fallback``:
    banned nodes too)."""
    cands = self.live_slots(banned=fallback).get(slot, [])
    if wanted is not None:
      cands = [c for c in cands if c[1] == tuple(wanted)]
    if not cands:
      return []
    cands = [cands[i] for i in rng.permutation(len(cands))]
    first = cands[0]
    rest = sorted(cands[1:], key=lambda c: c[1] != first[1])  # stable: same run first
    return [first] + rest[:self.retries]

  def _record(self, node_id: str, outcome: str, seconds: float, shape):
    """``seconds``: the hop's round trip per hop queued at the node when it was sent."""
    with self._lock:
      n = self._nodes[node_id]
      n.inflight -= 1
      if outcome == "ok":
        if shape in n.shapes:  # a first call compiles: not a sample of the hop time
          self._average(n, seconds)
        n.shapes.add(shape)
        n.served += 1
        n.failures = 0
        if n.state == BANNED:
          n.state = ALIVE
          self._event(n, ALIVE)
      elif outcome == "dead":
        n.failed += 1
        self._mark_dead(n)
      else:
        n.failed += 1
        if outcome == "timeout":  # at least this slow: a late node's average grows
          self._average(n, seconds)
        if n.state != DEAD:
          self._ban(n, self.clock())
