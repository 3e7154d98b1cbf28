"""The swarm on real Ray processes (on loopback): exact logits against the model in one
process, a merged swarm against ``merge_params``, a killed / stalled node, a node joining by
name, refused nodes, and one-line errors. One Ray instance and a few node processes for the
module; every process signalled here is one of this swarm's nodes, by the pid it reported."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lsvit import checkpoint
from lsvit import model as model_lib
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

CFG = dict(depth=4, width=32, mlp_dim=64, num_heads=2, patch_size=2, image_size=8, channels=1,
           num_classes=10, variant="position")


def _checkpoint(path, seed, **over):
  """A converted checkpoint with random weights, perturbed so that nothing (the zero-initialised
  head, the position table) is zero: the logits differ clearly between orders."""
  cfg = dict(CFG, **over)
  params = model_lib.init_params(model_lib.build(cfg), seed)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, 0.1, a.shape).astype(a.dtype),
                        params)
  checkpoint.save_params(str(path), params, cfg)
  return str(path), params


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("swarm")
  return [_checkpoint(d / f"run{i}", i) for i in range(2)] + [
      _checkpoint(d / "wide", 5, width=48), _checkpoint(d / "other_weights", 9)]


@pytest.fixture(scope="module")
def swarm(runs):
  from lsvit.swarm import Swarm
  with Swarm([runs[0][0], runs[1][0]], nodes=3, replicas=2, heartbeat=0.3, name="test",
             seed=0, ban_base=0.2) as s:
    yield s


def _images(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype(np.float32)


def _reference(params, images, order):
  m = model_lib.build(dict(CFG, impl="gather"))
  return np.asarray(m.apply({"params": params}, images, order=np.asarray(order))["logits"])


def test_bound_to_loopback_only(swarm):
  import ray
  assert ray.util.get_node_ip_address() == "127.0.0.1"
  assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
  assert len(swarm.nodes()) == 3 and {n["state"] for n in swarm.nodes()} == {"alive"}
  assert all(n["pid"] != os.getpid() for n in swarm.nodes())


def test_logits_equal_the_model_run_in_the_route_order(swarm, runs):
  x = _images(3)
  params = runs[0][1]
  for route in ([(0, 2), (0, 0), (0, 3), (0, 1)], [(0, 3), (0, 1)]):
    r = swarm.classify(x, route=route)
    ref = _reference(params, x, [l for _, l in route])
    assert r.route == route and not r.skipped
    assert np.abs(ref).max() > 0.1  # not two near-zero outputs
    np.testing.assert_allclose(r.logits, ref, atol=1e-5, rtol=0)
  # a fresh random order per request, each equal to the model in that order
  seen = set()
  for i in range(6):
    r = swarm.classify(x[:1])
    assert sorted(l for _, l in r.route) == [0, 1, 2, 3]
    seen.add(tuple(r.route))
    merged = swarm.model.merged_params(r.route)
    np.testing.assert_allclose(r.logits, _reference(merged, x[:1], [l for _, l in r.route]),
                               atol=1e-5, rtol=0)
  assert len(seen) > 1
  assert {run for route in seen for run, _ in route} == {0, 1}  # layers of both runs served


def test_merged_route_equals_merge_params(swarm, runs):
  from lsvit import evaluators
  x = _images(2, 1)
  route = [(1, 3), (0, 0), (1, 1), (0, 2)]
  r = swarm.classify(x, route=route)
  sources = np.array([0, 1, 0, 1])  # slot l from the run the route takes it from
  merged = evaluators.merge_params(evaluators.stack_params([runs[0][1], runs[1][1]]), sources, 0)
  ref = _reference(merged, x, [3, 0, 1, 2])
  np.testing.assert_allclose(r.logits, ref, atol=1e-5, rtol=0)
  # a different run's layer gives different logits: the test can tell runs apart
  other = _reference(merged, x, [3, 0, 1, 2]) - _reference(runs[0][1], x, [3, 0, 1, 2])
  assert np.abs(other).max() > 1e-2


def test_bad_input(swarm):
  from lsvit.swarm import SwarmError
  with pytest.raises(ValueError, match=r"expected images of shape \[batch, 8, 8, 1\]"):
    swarm.classify(np.zeros((2, 16, 16, 1), np.float32))
  with pytest.raises(SwarmError, match=r"not a layer of this swarm"):
    swarm.classify(_images(1), route=[(0, 7)])
  with pytest.raises(ValueError, match=r"duplicate entries \[1\]"):
    swarm.classify(_images(1), order=[1, 0, 1])
  with pytest.raises(SwarmError, match=r"k=0"):
    swarm.classify(_images(1), k=0)
  info = {"spec": dict(swarm.model.spec, width=48, variant="layershuffle"), "layers": [],
          "digests": {}, "pid": 1, "host": "h"}
  with pytest.raises(SwarmError, match=r"width=48.*variant='layershuffle'.*width=32.*"
                                       r"variant='position'"):
    swarm._admit("stranger", info, None)


def test_node_joining_by_name_is_used_and_a_mismatched_one_refused(swarm, runs):
  """What `python -m lsvit.swarm join` does on another host: a named node in the swarm's
  namespace, loading its layers itself, found by the heartbeat."""
  import ray
  from lsvit.swarm import NODE_PREFIX
  from lsvit.swarm.node import LayerNode
  cls = ray.remote(max_restarts=0)(LayerNode)
  good = cls.options(name=f"{NODE_PREFIX}joined", namespace=swarm.namespace, num_cpus=0).remote(
      f"{NODE_PREFIX}joined", source=runs[1][0], indices=[0, 2], run=1)
  bad = cls.options(name=f"{NODE_PREFIX}mismatch", namespace=swarm.namespace, num_cpus=0).remote(
      f"{NODE_PREFIX}mismatch", source=runs[3][0], indices=[1], run=0)
  try:
    ray.get([good.info.remote(), bad.info.remote()], timeout=120)
    deadline = time.time() + 20
    while time.time() < deadline and not any(
        n["id"] == f"{NODE_PREFIX}joined" and n["state"] == "alive" for n in swarm.nodes()):
      time.sleep(0.1)
    ids = {n["id"]: n for n in swarm.nodes()}
    assert ids[f"{NODE_PREFIX}joined"]["state"] == "alive"
    assert f"{NODE_PREFIX}mismatch" not in ids  # other weights for run 0's layer 1: refused
    r = swarm.classify(_images(1), route=[(1, 0), (1, 2)])
    assert r.route == [(1, 0), (1, 2)]
    used = {h.node for _ in range(30) for h in swarm.classify(_images(1)).hops}
    assert f"{NODE_PREFIX}joined" in used
  finally:
    swarm.remove_node(f"{NODE_PREFIX}joined")
    ray.kill(good)
    ray.kill(bad)


def test_killed_and_stalled_nodes_every_request_answered(swarm):
  """SIGKILL one node and SIGSTOP another mid-stream: every request is answered (3 nodes, 2
  copies of every layer), the killed node is marked dead and never used again, the stalled one
  is banned and used again after SIGCONT; a node added afterwards serves requests."""
  x = _images(1)
  for _ in range(20):  # every node has run this input shape: deadlines are the adaptive ones
    swarm.classify(x)
  nodes = swarm.nodes()
  victim, stalled = nodes[0], nodes[1]
  os.kill(victim["pid"], signal.SIGKILL)
  os.kill(stalled["pid"], signal.SIGSTOP)
  try:
    t = time.time()
    results = [swarm.classify(x) for _ in range(10)]
    assert time.time() - t < 60
    assert all(len(r.route) >= 1 for r in results)
    states = {n["id"]: n["state"] for n in swarm.nodes()}
    assert states[victim["id"]] == "dead" and states[stalled["id"]] == "banned"
  finally:
    os.kill(stalled["pid"], signal.SIGCONT)
  deadline = time.time() + 30
  while time.time() < deadline:
    swarm.classify(x)
    if any(n["id"] == stalled["id"] and n["state"] == "alive" for n in swarm.nodes()):
      break
    time.sleep(0.2)
  assert {n["id"]: n["state"] for n in swarm.nodes()}[stalled["id"]] == "alive"
  (added,) = swarm.add_nodes(1)
  used = {h.node for _ in range(20) for h in swarm.classify(x).hops}
  assert added in used and victim["id"] not in used


def test_no_node_alive_is_a_clear_error(swarm):
  from lsvit.swarm import NoLayersAlive
  keep = [n for n in swarm.nodes() if n["state"] not in ("dead", "left")]
  for n in keep:
    swarm.router.remove(n["id"])
  with pytest.raises(NoLayersAlive, match="no layer of the model is alive"):
    swarm.classify(_images(1))


def _cli(*args, timeout=120):
  p = subprocess.run([sys.executable, "-m", "lsvit.swarm", *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return p.returncode, p.stdout, p.stderr


def test_cli_errors_are_one_line(runs, tmp_path):
  cases = [
      (("bench", "--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")),
       "does not exist"),
      (("serve", "--workdir", runs[0][0], "--address", "127.0.0.1:9"),
       "cannot reach a Ray head at 127.0.0.1:9"),
      (("serve", "--workdir", runs[0][0], runs[2][0]), "width=48"),
      (("bench", "--workdir", runs[0][0], "--out", str(tmp_path / "o"), "--chaos", "kill=9"),
       "leave at least one alive"),
      (("serve", "--workdir", runs[0][0], "--nodes", "0"), "must be at least 1"),
  ]
  for args, message in cases:
    code, out, err = _cli(*args)
    assert code != 0, args
    assert message in err, (args, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
