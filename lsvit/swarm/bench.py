"""``python -m lsvit.swarm bench``: a chaos run of a swarm on a trained model's eval split,
checked against the offline model, and the swarm's speed measured side by side with the same
model in one process. Writes ``swarm.json`` and ``swarm.png`` to ``--out``.

Chaos SPEC: comma-separated events, each at a seeded point between 15% and 75% of the requests:
``kill=F`` SIGKILL F nodes (a fraction < 1 of the starting nodes, or a count), ``stop=N:S``
SIGSTOP N nodes for S seconds, ``add=N`` add N nodes, ``slow=N:F`` make N nodes F times slower
to answer (each hop delayed by F-1 times the median hop round trip so far).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from lsvit.swarm import parts
from lsvit.swarm.router import NoLayersAlive, SwarmError

DEFAULT_CHAOS = "kill=0.34,stop=1:3,add=2"


# ----------------------------------------------------------------------------- chaos

def parse_chaos(spec: str, nodes: int) -> List[dict]:
  """Events from SPEC (see the module doc), without their times."""
  events = []
  for item in [s.strip() for s in (spec or "").split(",") if s.strip()]:
    kind, _, arg = item.partition("=")
    try:
      if kind == "kill":
        v = float(arg)
        count = int(round(v * nodes)) if v < 1 else int(v)
        events += [{"event": "kill"}] * count
      elif kind == "stop":
        n, _, secs = arg.partition(":")
        events += [{"event": "stop", "seconds": float(secs or 3)}] * int(n)
      elif kind == "add":
        events += [{"event": "add"}] * int(arg)
      elif kind == "slow":
        n, _, factor = arg.partition(":")
        events += [{"event": "slow", "factor": float(factor or 10)}] * int(n)
      else:
        raise ValueError(kind)
    except ValueError:
      raise SwarmError(f"--chaos {spec!r}: cannot read {item!r}; use e.g. "
                       f"'kill=0.34,stop=1:3,add=2,slow=1:10' (kill: fraction or count, stop: "
                       f"nodes:seconds, add: nodes, slow: nodes:factor)") from None
  kills = sum(e["event"] == "kill" for e in events)
  if kills >= nodes:
    raise SwarmError(f"--chaos kills {kills} of {nodes} nodes: leave at least one alive")
  return events


class Chaos:
  """Fires the events at seeded request counts; signals go to node process ids on this host."""

  def __init__(self, swarm, events: List[dict], requests: int, seed: int, log=print):
    self.swarm, self.log = swarm, log
    rng = np.random.default_rng([seed, 17])
    at = np.sort(rng.integers(int(0.15 * requests), int(0.75 * requests) + 1, len(events)))
    self.pending = [dict(e, at=int(a)) for e, a in zip(events, at)]
    self.rng = rng
    self.fired: List[dict] = []
    self.victims = set()
    self.t0 = time.perf_counter()
    self._lock = threading.Lock()
    self._timers: List[threading.Timer] = []
    self._threads: List[threading.Thread] = []

  def _pick_locked(self) -> Optional[dict]:
    alive = [n for n in self.swarm.nodes() if n["state"] in ("alive", "banned")
             and n["id"] not in self.victims]
    return alive[int(self.rng.integers(len(alive)))] if alive else None

  def progress(self, done: int):
    """Called as requests complete; due events fire on their own threads (adding a node takes
    seconds, and requests must not wait for it)."""
    with self._lock:
      while self.pending and self.pending[0]["at"] <= done:
        thread = threading.Thread(target=self._fire, args=(self.pending.pop(0), done))
        thread.start()
        self._threads.append(thread)

  def _fire(self, e: dict, done: int):
    rec = dict(e, t=time.perf_counter() - self.t0, done=done)
    if e["event"] == "add":
      rec["nodes"] = self.swarm.add_nodes(1)
    else:
      with self._lock:
        node = self._pick_locked()
        if node is None:
          return
        self.victims.add(node["id"])
      rec["node"], rec["pid"] = node["id"], node["pid"]
      if e["event"] == "kill":
        os.kill(node["pid"], signal.SIGKILL)
      elif e["event"] == "stop":
        os.kill(node["pid"], signal.SIGSTOP)
        timer = threading.Timer(e["seconds"], self._resume, (node,))
        timer.start()
        self._timers.append(timer)
      elif e["event"] == "slow":
        rec["delay"] = (e["factor"] - 1) * self.swarm.router.median_hop()
        self.swarm.set_delay(node["id"], rec["delay"])
    self.fired.append(rec)
    self.log(f"chaos: {rec['event']} {rec.get('node') or rec.get('nodes')} at request {done}")

  def _resume(self, node):
    os.kill(node["pid"], signal.SIGCONT)
    self.victims.discard(node["id"])
    self.fired.append({"event": "cont", "node": node["id"], "pid": node["pid"],
                       "t": time.perf_counter() - self.t0})

  def finish(self):
    for t in self._threads:
      t.join()
    for t in self._timers:
      t.cancel()
      if not t.finished.is_set():
        t.function(*t.args)  # never leave a node stopped


# ----------------------------------------------------------------------------- data

def eval_split(workdir: str, limit: Optional[int] = None):
  """(images, labels) of a training workdir's eval split, preprocessed as in training."""
  from ml_collections import ConfigDict
  from lsvit import data as data_lib
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise SwarmError(f"workdir {workdir} does not exist: pass a training workdir (train.py)")
  if not os.path.exists(path):
    raise SwarmError(f"{workdir} has no config.json: the bench needs a training workdir "
                     f"(made by train.py) for its eval split")
  config = json.load(open(path))
  d = ConfigDict(config["data"])
  model = json.load(open(os.path.join(workdir, "model.json")))["model"]
  source = data_lib.get_source(d, d.eval_split)
  pp = data_lib.Preprocess(d.preprocess, model["image_size"], model["channels"])
  n = len(source) if limit is None else min(limit, len(source))
  items = [source[i] for i in range(n)]
  return (np.stack([pp(x) for x, _ in items]).astype(np.float32),
          np.asarray([y for _, y in items], np.int64))


# ----------------------------------------------------------------------------- requests

def serve_requests(swarm, images, labels, requests: int, concurrency: int,
                   on_done=None, k: Optional[Sequence[int]] = None, batch: int = 1):
  """Sends ``requests`` requests (image ``i % len(images)``; ``k`` cycled over requests) with
  ``concurrency`` in flight. Returns one record per answer, in completion order."""
  records, lock = [], threading.Lock()
  t0 = time.perf_counter()

  def one(i):
    idx = [(i * batch + j) % len(images) for j in range(batch)]
    kk = None if not k else int(k[i % len(k)])
    start = time.perf_counter() - t0
    try:
      r = swarm.classify(images[idx], k=kk)
      rec = {"id": i, "images": idx, "ok": True, "pred": r.logits.argmax(-1).tolist(),
             "correct": int((r.logits.argmax(-1) == labels[idx]).sum()),
             "route": [list(l) for l in r.route], "skipped": [list(l) for l in r.skipped],
             "hops": [[h.node, h.outcome, h.seconds, h.compute] for h in r.hops],
             "logits": r.logits.tolist(), "seconds": r.seconds}
    except NoLayersAlive as e:
      rec = {"id": i, "images": idx, "ok": False, "error": str(e),
             "seconds": time.perf_counter() - t0 - start}
    rec.update(start=start, end=time.perf_counter() - t0, k=kk)
    with lock:
      records.append(rec)
      n = len(records)
    if on_done:
      on_done(n)
    return rec

  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    list(pool.map(one, range(requests)))
  return records


def check_answers(records: List[dict], requests: int) -> dict:
  """Every request answered exactly once: counts of answers per request id."""
  counts: Dict[int, int] = {}
  for r in records:
    counts[r["id"]] = counts.get(r["id"], 0) + 1
  missing = [i for i in range(requests) if i not in counts]
  dup = [i for i, c in counts.items() if c > 1]
  return {"requests": requests, "answers": len(records), "missing": len(missing),
          "duplicated": len(dup), "errors": sum(not r["ok"] for r in records),
          "exactly_once": not missing and not dup and len(records) == requests}


def offline_replay(model, images, records) -> dict:
  """Each answered request re-run offline in one process on exactly its route (same layers of
  the same runs, same order): predictions agree, and the largest logit difference."""
  import jax
  apply = model.one_process()
  merged = len(model.sources) > 1
  single = jax.tree.map(jax.numpy.asarray, model.params[model.base])
  agree, worst, n = 0, 0.0, 0
  for r in records:
    if not r["ok"]:
      continue
    route = [tuple(l) for l in r["route"]]
    params = model.merged_params(route) if merged else single
    logits = np.asarray(apply(params, images[r["images"]], np.asarray([l for _, l in route],
                                                                       np.int32)))
    worst = max(worst, float(np.abs(logits - np.asarray(r["logits"])).max()))
    agree += int((logits.argmax(-1) == np.asarray(r["pred"])).all())
    n += 1
  return {"requests": n, "same_prediction": agree, "max_logit_diff": worst}


def accuracy_by_k(records) -> Dict[int, dict]:
  out: Dict[int, dict] = {}
  for r in records:
    if r["ok"]:
      o = out.setdefault(len(r["route"]), {"requests": 0, "images": 0, "correct": 0})
      o["requests"] += 1
      o["images"] += len(r["images"])
      o["correct"] += r["correct"]
  for o in out.values():
    p = o["correct"] / o["images"]
    o.update(top1=p, se=float(np.sqrt(p * (1 - p) / o["images"])))
  return dict(sorted(out.items()))


def offline_curve(workdirs: Sequence[str], ks: Sequence[int], seeds: Sequence[int],
                  merged: bool, draws: int = 5) -> Dict[int, dict]:
  """``evaluate.py --mode prune`` (arbitrary order, random subsets) for each k, mean and spread
  over ``seeds`` of the order draws; a merged swarm at full depth: ``--mode merge``."""
  from lsvit import evaluators
  runs = evaluators.load_runs(workdirs)
  depth = runs[0].depth
  per_k: Dict[int, List[float]] = {}
  for seed in seeds:
    ctx = evaluators.Context(runs, seed=seed, progress=False)
    res = evaluators.get("prune", ks=list(ks), draws=draws)(ctx, runs)
    for k in ks:
      vals = [row[f"k{k}_arbitrary"]["top1"] for row in res["runs"]]
      per_k.setdefault(k, []).append(float(np.mean(vals)))
    if merged and depth in ks:
      m = evaluators.get("merge", merges=20, allow_repeats=True, base="0")(ctx, runs)
      per_k.setdefault(-depth, []).append(m["merged"]["top1"]["mean"])
  curve = {}
  for k, v in per_k.items():
    curve[k] = {"top1": float(np.mean(v)), "spread": float(np.std(v, ddof=1)) if len(v) > 1
                else 0.0, "values": v}
  return curve


def compare(swarm_acc: Dict[int, dict], curve: Dict[int, dict], merged: bool, depth: int):
  """The swarm's accuracy at k layers against the offline curve: within max(2 points, the
  curve's spread over seeds); also said: within 2 binomial standard errors of the swarm's."""
  rows = []
  for k, s in swarm_acc.items():
    if merged and k != depth:
      continue  # offline, merged models are evaluated at full depth only (--mode merge)
    ref = curve.get(-k if merged else k)
    if ref is None:
      continue
    tol = max(0.02, ref["spread"])
    diff = s["top1"] - ref["top1"]
    rows.append({"k": k, "swarm": s["top1"], "swarm_images": s["images"], "offline": ref["top1"],
                 "offline_spread": ref["spread"], "diff": diff, "tolerance": tol,
                 "within": abs(diff) <= tol,
                 "within_2se": abs(diff) <= max(tol, 2 * s["se"])})
  return rows


# ----------------------------------------------------------------------------- speed

def percentiles(values, qs=(50, 99)) -> dict:
  v = np.asarray(values, np.float64)
  return {f"p{q}": float(np.percentile(v, q)) for q in qs} if v.size else {}


def speed(swarm, images, requests: int, log=print) -> dict:
  """Side by side in one run, loopback: per-hop overhead, request latency vs one process,
  throughput 8 concurrent vs 1, a 10x slow node with and without deadlines, Ray's floor."""
  import jax
  model = swarm.model
  labels = np.zeros(len(images), np.int64)
  out = {}
  serve_requests(swarm, images, labels, 20, 1)  # warm: every node compiles
  one = _answered(serve_requests(swarm, images, labels, requests, 1), out, "fault_free")
  hops = [h for r in one for h in r["hops"] if h[1] == "ok"]
  out["hop_overhead_s"] = percentiles([h[2] - h[3] for h in hops])
  out["hop_compute_s"] = percentiles([h[3] for h in hops])
  out["request_s"] = percentiles([r["seconds"] for r in one])
  # the same model, same order lengths, in one process
  params = jax.tree.map(jax.numpy.asarray, model.params[model.base])
  one_process = model.one_process()
  apply = lambda x, order: one_process(params, x, order)
  rng = np.random.default_rng(0)
  order = rng.permutation(model.depth).astype(np.int32)
  apply(images[:1], order).block_until_ready()
  local = []
  for i in range(requests):
    t = time.perf_counter()
    apply(images[i % len(images)][None],
          rng.permutation(model.depth).astype(np.int32)).block_until_ready()
    local.append(time.perf_counter() - t)
  out["one_process_request_s"] = percentiles(local)
  out["latency_ratio_p50"] = out["request_s"]["p50"] / out["one_process_request_s"]["p50"]
  log(f"speed: hop overhead p50 {1e3 * out['hop_overhead_s']['p50']:.2f} ms, request p50 "
      f"{1e3 * out['request_s']['p50']:.1f} ms vs one process "
      f"{1e3 * out['one_process_request_s']['p50']:.2f} ms")
  # throughput
  for c in (1, 8):
    t = time.perf_counter()
    recs = _answered(serve_requests(swarm, images, labels, requests, c), out, f"concurrent_{c}")
    elapsed = time.perf_counter() - t
    out[f"throughput_{c}"] = len(recs) / elapsed
    # layers run per second too: a request that skipped late layers is cheaper, not faster
    out[f"layers_per_s_{c}"] = sum(len(r["route"]) for r in recs) / elapsed
    out[f"layers_per_request_{c}"] = float(np.mean([len(r["route"]) for r in recs]))
  out["throughput_ratio_8_vs_1"] = out["throughput_8"] / out["throughput_1"]
  out["layers_per_s_ratio_8_vs_1"] = out["layers_per_s_8"] / out["layers_per_s_1"]
  log(f"speed: throughput {out['throughput_1']:.1f} req/s alone, {out['throughput_8']:.1f} with "
      f"8 in flight ({out['throughput_ratio_8_vs_1']:.2f}x; layers run per second "
      f"{out['layers_per_s_ratio_8_vs_1']:.2f}x, {out['layers_per_request_8']:.2f} layers per "
      f"request)")
  # Ray's floor: an empty call to a node and back
  handle = next(iter(swarm.transport.handles.values()))
  floor = []
  for _ in range(requests):
    t = time.perf_counter()
    swarm.ray.get(handle.ping.remote())
    floor.append(time.perf_counter() - t)
  out["ray_empty_round_trip_s"] = percentiles(floor)
  # one node 10x slow to answer: each of its hops delayed by 9 median hop round trips
  free = [r["seconds"] for r in one]
  slow_id = swarm.nodes()[0]["id"]
  out["slow_node_delay_s"] = 9 * float(np.median([h[2] for h in hops]))
  swarm.set_delay(slow_id, out["slow_node_delay_s"])
  saved = swarm.router.hop_timeout
  for name, timeout in (("no_deadline", 1e9), ("deadline", saved)):
    swarm.router.hop_timeout = timeout
    recs = _answered(serve_requests(swarm, images, labels, requests, 1), out, f"slow_{name}")
    out[f"slow_node_{name}_request_s"] = percentiles([r["seconds"] for r in recs])
    out[f"slow_node_{name}_layers_per_request"] = float(np.mean([len(r["route"]) for r in recs]))
  swarm.router.hop_timeout = saved
  swarm.set_delay(slow_id, 0.0)
  out["fault_free_request_s"] = percentiles(free)
  for name in ("no_deadline", "deadline"):
    out[f"slow_node_{name}_p99_ratio"] = (out[f"slow_node_{name}_request_s"]["p99"]
                                          / out["fault_free_request_s"]["p99"])
  log(f"speed: one node 10x slow, p99 / fault-free p99: {out['slow_node_deadline_p99_ratio']:.2f} "
      f"with deadlines ({out['slow_node_deadline_layers_per_request']:.2f} layers per request), "
      f"{out['slow_node_no_deadline_p99_ratio']:.2f} without")
  return out


def _answered(records, out: dict, phase: str) -> List[dict]:
  """The answered requests of a speed phase; how many could not be served is kept in ``out``."""
  out[f"{phase}_unserved"] = sum(not r["ok"] for r in records)
  return [r for r in records if r["ok"]]


# ----------------------------------------------------------------------------- plot

def plot(result: dict, records: List[dict], path: str) -> str:
  from lsvit.plots import _figure
  fig = _figure(figsize=(12, 4.4))
  ax, ax2 = fig.subplots(1, 2)
  acc = result["accuracy_by_k"]
  ks = sorted(int(k) for k in acc)
  ax.errorbar(ks, [100 * acc[k]["top1"] for k in ks], yerr=[200 * acc[k]["se"] for k in ks],
              fmt="o", capsize=3, label="swarm (± 2 s.e.)")
  merged = len(result["workdirs"]) > 1
  curve = {int(k): v for k, v in result["offline_curve"].items() if int(k) > 0}
  ck = sorted(curve)
  ax.errorbar(ck, [100 * curve[k]["top1"] for k in ck],
              yerr=[100 * curve[k]["spread"] for k in ck], fmt="s--", capsize=3,
              label="offline, evaluate.py --mode prune (arbitrary order"
              + (", each run alone)" if merged else ")"))
  merged_points = {int(k): v for k, v in result["offline_curve"].items() if int(k) < 0}
  for k, v in merged_points.items():
    ax.plot([-k], [100 * v["top1"]], "D", label="offline, --mode merge")
  for k in ks:
    ax.annotate(str(acc[k]["requests"]), (k, 100 * acc[k]["top1"]), fontsize=7,
                xytext=(3, 3), textcoords="offset points")
  ax.set_ylim(0, 105)
  ax.set_xlabel("layers the request ran through")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("accuracy vs layers alive (labels: requests)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ok = [r for r in records if r["ok"]]
  ax2.plot([r["end"] for r in ok], [1e3 * r["seconds"] for r in ok], ".", ms=2, alpha=0.5)
  colors = {"kill": "red", "stop": "orange", "cont": "green", "add": "blue", "slow": "purple"}
  seen = set()
  for e in result["chaos"]:
    label = e["event"] if e["event"] not in seen else None
    seen.add(e["event"])
    ax2.axvline(e["t"], color=colors.get(e["event"], "k"), ls="--", lw=1, label=label)
  ax2.set_yscale("log")
  ax2.set_xlabel("time (s)")
  ax2.set_ylabel("request latency (ms)")
  ax2.set_title("latency over time, fault events marked")
  if seen:
    ax2.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


# ----------------------------------------------------------------------------- main

def run(workdirs: Sequence[str], nodes: int, requests: int, chaos: str, out: str, *,
        replicas: int = 1, concurrency: int = 4, seed: int = 0, k: Optional[Sequence[int]] = None,
        speed_requests: int = 0, offline_seeds: int = 3, address: Optional[str] = None,
        batch: int = 1, name: str = "lsvit", log=print) -> dict:
  from lsvit import checkpoint
  from lsvit.swarm import Swarm
  checkpoint.refuse_existing(out)
  events = parse_chaos(chaos, nodes)
  model = parts.load(workdirs)
  images, labels = eval_split(workdirs[0])
  result = {"workdirs": list(workdirs), "nodes": nodes, "replicas": replicas,
            "requests": requests, "batch": batch, "concurrency": concurrency, "chaos_spec": chaos,
            "k": list(k) if k else None, "seed": seed}
  def start():
    t0 = time.perf_counter()
    s = Swarm(model, nodes, replicas=replicas, seed=seed, address=address, name=name)
    log(f"swarm up in {time.perf_counter() - t0:.1f} s: {nodes} nodes, "
        f"{len(s.model.layers())} layers x {replicas}")
    return s

  if speed_requests:  # a swarm of its own: the slow node's bans must not reach the chaos run
    with start() as s:
      result["speed"] = speed(s, images, speed_requests, log)
  with start() as s:
    chaos_ctl = Chaos(s, events, requests, seed, log)
    progress = _Progress(requests, log)

    def on_done(n):
      chaos_ctl.progress(n)
      progress(n)

    try:
      records = serve_requests(s, images, labels, requests, concurrency, on_done, k, batch)
    finally:
      chaos_ctl.finish()
    result["chaos"] = chaos_ctl.fired
    result["nodes_after"] = s.nodes()
    result["router_events"] = s.router.events
  result["answers"] = check_answers(records, requests)
  log(f"answers: {json.dumps(result['answers'])}")
  result["offline_replay"] = offline_replay(model, images, records)
  log(f"offline replay of the routes taken: {json.dumps(result['offline_replay'])}")
  result["accuracy_by_k"] = accuracy_by_k(records)
  merged = len(workdirs) > 1
  ks = sorted(result["accuracy_by_k"])
  result["offline_curve"] = offline_curve(workdirs, ks, range(offline_seeds), merged)
  result["comparison"] = compare(result["accuracy_by_k"], result["offline_curve"], merged,
                                 model.depth)
  for row in result["comparison"]:
    log(f"k={row['k']:2d}: swarm {100 * row['swarm']:.1f}% ({row['swarm_images']} images), "
        f"offline {100 * row['offline']:.1f}% ± {100 * row['offline_spread']:.1f}: "
        f"{'within' if row['within'] else 'outside'} {100 * row['tolerance']:.1f} points")
  ok = [r for r in records if r["ok"]]
  hops = [h for r in ok for h in r["hops"]]
  result["latency_s"] = percentiles([r["seconds"] for r in ok])
  result["hop_outcomes"] = {o: sum(h[1] == o for h in hops) for o in
                            ("ok", "timeout", "dead", "error")}
  os.makedirs(out)
  result["figure"] = plot(result, records, os.path.join(out, "swarm.png"))
  result["records"] = [{k: v for k, v in r.items() if k != "logits"} for r in records]
  with open(os.path.join(out, "swarm.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  log(f"wrote {out}/swarm.json and {result['figure']}")
  return result


class _Progress:
  def __init__(self, total: int, log, every: float = 5.0):
    self.total, self.log, self.every = total, log, every
    self.t0 = self.last = time.perf_counter()

  def __call__(self, n: int):
    now = time.perf_counter()
    if now - self.last >= self.every or n == self.total:
      self.last = now
      rate = n / max(now - self.t0, 1e-9)
      eta = (self.total - n) / max(rate, 1e-9)
      self.log(f"{n}/{self.total} requests, {rate:.1f} req/s, ETA {eta:.0f} s")
