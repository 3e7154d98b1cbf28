"""The swarm's router against an in-process fake transport with seeded faults: routes,
retries, bans with backoff, joins, and exactly one answer per request. No Ray, no JAX."""
import concurrent.futures
import threading

import numpy as np
import pytest

from lsvit.swarm import router as R


class Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


class FakeTransport(R.Transport):
  """Layer (run, l) maps x to 3x + 10 l + 1000 run (order-dependent, so the route shows in
  the output). ``modes[node]``: ok | timeout | dead | error | flaky (seeded random faults)."""

  def __init__(self, seed=0, p_fault=0.0):
    self.modes, self.calls = {}, []
    self.rng = np.random.default_rng(seed)
    self.p_fault = p_fault
    self.lock = threading.Lock()

  def call(self, node, layer, x, position, emb, timeout):
    with self.lock:
      self.calls.append((node, layer, position))
      mode = self.modes.get(node, "ok")
      if mode == "late_once":  # late the first time, then in time
        self.modes[node] = "ok"
        mode = "timeout"
      if mode == "flaky":
        u = self.rng.random()
        mode = ("timeout" if u < self.p_fault / 2 else "error" if u < self.p_fault else "ok")
    if mode == "timeout":
      raise R.HopTimeout(node)
    if mode == "dead":
      raise R.NodeDead(node)
    if mode == "error":
      raise R.HopFailed(node)
    return 3 * x + 10 * layer[1] + 1000 * layer[0], 0.001

  def ping(self, nodes, timeout):
    return {n: {"timeout": "timeout", "dead": "dead"}.get(self.modes.get(n), "ok")
            for n in nodes}


def apply(route, x):
  for run, l in route:
    x = 3 * x + 10 * l + 1000 * run
  return x


def make(nodes, **kw):
  clock = Clock()
  t = FakeTransport(kw.pop("seed", 0), kw.pop("p_fault", 0.0))
  r = R.Router(t, clock=clock, hop_timeout=kw.pop("hop_timeout", 1.0), **kw)
  for node_id, layers in nodes.items():
    r.add(R.Node(node_id, tuple(layers), state=R.ALIVE))
  return r, t, clock


def spread(depth=6, nodes=3, runs=(0,)):
  out = {f"n{i}": [] for i in range(nodes)}
  for i, (run, l) in enumerate((r, l) for r in runs for l in range(depth)):
    out[f"n{i % nodes}"].append((run, l))
  return out


def test_each_live_layer_once_in_a_fresh_order():
  r, t, _ = make(spread())
  routes = set()
  for seed in range(20):
    x, done, skipped, hops = r.run(np.float64(1.0), np.random.default_rng(seed))
    assert sorted(l for _, l in done) == list(range(6)) and not skipped
    assert x == apply(done, 1.0)
    assert [h.position for h in hops] == list(range(6))
    routes.add(tuple(done))
  assert len(routes) >= 17  # a fresh order per request (of 720 possible)


def test_k_layers_and_given_route():
  r, _, _ = make(spread())
  _, done, _, _ = r.run(np.float64(0.0), np.random.default_rng(0), k=3)
  assert len(done) == 3 and len(set(done)) == 3
  route = [(0, 4), (0, 1), (0, 5)]
  x, done, _, _ = r.run(np.float64(2.0), np.random.default_rng(0), route=route)
  assert done == route and x == apply(route, 2.0)


def test_late_hop_retried_on_a_replica_then_banned_with_backoff():
  nodes = {"a": [(0, 0)], "b": [(0, 0)], "c": [(1, 0)]}
  r, t, clock = make(nodes, ban_base=1.0, ban_max=4.0)
  t.modes["a"] = "timeout"
  seen_a = False
  for seed in range(10):
    _, done, skipped, hops = r.run(np.float64(0.0), np.random.default_rng(seed))
    assert len(done) == 1 and not skipped
    if hops[0].node == "a":
      seen_a = True
      assert hops[0].outcome == "timeout"
      assert hops[1].layer == (0, 0)  # the same run's replica before another run's copy
      break
  assert seen_a
  a = r.node("a")
  assert a.state == R.BANNED and a.banned_until == clock.t + 1.0
  assert all(n != "a" for n, _ in r.live_slots()[0])
  # ban ends: tried again, fails again: the ban doubles, up to ban_max
  bans = []
  for _ in range(4):
    clock.t = r.node("a").banned_until
    r.run(np.float64(0.0), np.random.default_rng(0), route=[(0, 0)])
    if r.node("a").state != R.BANNED:  # a replica served it; force a's turn
      continue
    bans.append(r.node("a").banned_until - clock.t)
  assert bans == sorted(bans) and bans[-1] == 4.0 and 2.0 in bans
  # a node that answers pings again is used again; its failures are forgotten only once it
  # answers a hop in time (a slow node that pings fine keeps its growing ban)
  t.modes["a"] = "ok"
  clock.t = r.node("a").banned_until
  r.heartbeat()
  assert r.node("a").state == R.ALIVE and r.node("a").failures > 0
  r.remove("b")  # a is now the only node with run 0's layer 0
  _, done, _, hops = r.run(np.float64(0.0), np.random.default_rng(0), route=[(0, 0)])
  assert [h.node for h in hops] == ["a"] and done == [(0, 0)]
  assert r.node("a").failures == 0


def test_dead_node_without_replica_is_skipped_and_never_used_again():
  r, t, _ = make(spread(depth=6, nodes=3))
  t.modes["n1"] = "dead"
  _, done, skipped, hops = r.run(np.float64(0.0), np.random.default_rng(1))
  dead_layers = {l for l in spread(6, 3)["n1"]}
  assert set(skipped) == dead_layers and len(done) == 4  # both drawn, neither reachable
  assert r.node("n1").state == R.DEAD
  assert [h.position for h in hops if h.outcome == "ok"] == list(range(len(done)))
  n = len(t.calls)
  _, done, skipped, _ = r.run(np.float64(0.0), np.random.default_rng(2))
  assert not skipped and len(done) == 4 and all(c[0] != "n1" for c in t.calls[n:])
  r.heartbeat()
  assert r.node("n1").state == R.DEAD


def test_every_node_banned_still_serves_dead_ones_do_not():
  r, t, _ = make({"a": [(0, 0)], "b": [(0, 1)]})
  t.modes.update(a="timeout", b="timeout")
  r.heartbeat()
  assert {n.state for n in r.nodes()} == {R.BANNED}
  t.modes.update(a="ok", b="ok")
  _, done, skipped, _ = r.run(np.float64(0.0), np.random.default_rng(0))
  assert sorted(done) == [(0, 0), (0, 1)] and not skipped  # late nodes beat none (Petals)
  t.modes.update(a="dead", b="dead")
  r.heartbeat()
  with pytest.raises(R.NoLayersAlive, match="no layer of the model is alive"):
    r.run(np.float64(0.0), np.random.default_rng(0))


def test_a_request_whose_every_hop_was_late_goes_again_through_the_banned_nodes():
  r, t, _ = make({"a": [(0, 0)], "b": [(0, 1)]})
  t.modes.update(a="late_once", b="late_once")
  _, done, skipped, hops = r.run(np.float64(0.0), np.random.default_rng(0))
  assert sorted(done) == [(0, 0), (0, 1)] and not skipped
  assert [h.outcome for h in hops] == ["timeout", "timeout", "ok", "ok"]
  assert [h.position for h in hops if h.outcome == "ok"] == [0, 1]


def test_no_layer_alive_is_an_error_not_an_answer():
  r, t, _ = make({"a": [(0, 0), (0, 1)]})
  r.remove("a")
  with pytest.raises(R.NoLayersAlive, match="no layer of the model is alive"):
    r.run(np.float64(0.0), np.random.default_rng(0))


def test_a_joining_node_is_used_after_one_heartbeat():
  r, t, _ = make({"a": [(0, 0)]})
  r.add(R.Node("b", ((0, 1),)))
  assert r.node("b").state == R.JOINING and 1 not in r.live_slots()
  r.heartbeat()
  assert r.node("b").state == R.ALIVE
  _, done, _, _ = r.run(np.float64(0.0), np.random.default_rng(0))
  assert sorted(done) == [(0, 0), (0, 1)]
  with pytest.raises(R.SwarmError, match="already in the swarm"):
    r.add(R.Node("b", ((0, 2),)))


def test_heartbeat_bans_a_stalled_node_and_drops_a_dead_one():
  r, t, clock = make({"a": [(0, 0)], "b": [(0, 1)]})
  t.modes.update(a="timeout", b="dead")
  r.heartbeat()
  assert r.node("a").state == R.BANNED and r.node("b").state == R.DEAD
  t.modes["a"] = "ok"  # SIGCONT: it answers again once its ban is over
  r.heartbeat()
  assert r.node("a").state == R.BANNED
  clock.t = r.node("a").banned_until
  r.heartbeat()
  assert r.node("a").state == R.ALIVE


def test_adaptive_deadline_follows_the_typical_node_not_one_slow_node():
  nodes = {f"n{i}": [(0, i)] for i in range(5)}
  r, t, _ = make(nodes, hop_timeout=None, timeout_factor=3.0, min_timeout=0.0,
                 first_timeout=30.0)
  assert r.timeout_for(r.node("n0"), (1,)) == 30.0  # never seen this shape: it compiles
  for _ in range(10):
    r.run(np.zeros(1), np.random.default_rng(0))
  typical = sorted(n.typical for n in r.nodes())
  assert all(v > 0 for v in typical)  # the first call (compilation) is not a sample
  assert r.timeout_for(r.node("n0"), (1,)) == pytest.approx(3 * np.median(typical))
  with r._lock:  # one node 100x slower than the rest: the deadline does not follow it
    r._nodes["n4"].typical = 100 * max(typical)
  now = [n.typical for n in r.nodes()]
  assert r.timeout_for(r.node("n0"), (1,)) == pytest.approx(3 * np.median(now))
  # 2 hops queued ahead at that node (other requests): 3 hops' time
  assert r.timeout_for(r.node("n0"), (1,), queued=2) == pytest.approx(9 * np.median(now))
  assert r.timeout_for(r.node("n0"), (1,)) <= 3 * max(typical)
  with r._lock:  # every node slower (load): the deadline grows with them
    for n in r._nodes.values():
      n.typical *= 10
  assert r.timeout_for(r.node("n0"), (1,)) > 10 * 3 * min(typical) * 0.99


def test_every_request_answered_exactly_once_under_seeded_faults():
  """200 concurrent requests while nodes fail at random, die and join: each gets exactly one
  result or one NoLayersAlive, and every result is the fake model applied along its route."""
  nodes = spread(depth=6, nodes=6, runs=(0, 1))
  r, t, clock = make(nodes, seed=3, p_fault=0.3, ban_base=0.01, retries=2)
  for n in nodes:
    t.modes[n] = "flaky"
  answers, lock = {}, threading.Lock()

  def one(i):
    if i == 50:
      t.modes["n0"] = "dead"
    if i == 100:
      r.add(R.Node("late", ((0, 0), (1, 3))))
      r.heartbeat()
    clock.t += 0.001
    x0 = np.float64(i)
    try:
      x, done, skipped, hops = r.run(x0, np.random.default_rng(i))
      ans = ("ok", x == apply(done, x0), len(done) + len(skipped) <= 6)
    except R.NoLayersAlive:
      ans = ("none", True, True)
    with lock:
      answers.setdefault(i, []).append(ans)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(one, range(200)))
  assert sorted(answers) == list(range(200))
  assert all(len(a) == 1 for a in answers.values())
  assert all(a[0][1] and a[0][2] for a in answers.values())
  assert sum(a[0][0] == "ok" for a in answers.values()) >= 150  # the rest: all nodes banned
  assert any(c[0] == "late" for c in t.calls)


def test_layers_dealt_to_nodes():
  from lsvit.swarm import assign
  layers = [(r, l) for r in range(3) for l in range(12)]
  nodes = assign(layers, 6, 1)
  assert sorted(l for n in nodes for l in n) == sorted(layers)
  for n in nodes:  # a node holds each slot at most once: a dead node takes no slot whole
    assert len({l for _, l in n}) == len(n)
  nodes = assign([(0, l) for l in range(12)], 6, 2)
  for l in range(12):
    holders = [i for i, n in enumerate(nodes) if (0, l) in n]
    assert len(holders) == 2  # two copies, on two nodes
  with pytest.raises(R.SwarmError, match="replicas=3: choose 1 to 2"):
    assign([(0, 0), (0, 1)], 2, 3)
  with pytest.raises(R.SwarmError, match="5 nodes but only 4 layer copies"):
    assign([(0, l) for l in range(4)], 5, 1)
