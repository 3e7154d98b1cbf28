"""``python -m lsvit.swarm serve|bench|join``: a mistake in the input is one line on stderr
and a non-zero exit."""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
from typing import List, Optional

from lsvit.cli import positive

USAGE = """Serve a LayerShuffle model as a swarm of layer-nodes on Ray.

  python -m lsvit.swarm serve --workdir runs/digits_layershuffle_seed0 --nodes 4 --duration 30
  python -m lsvit.swarm bench --workdir runs/digits_layershuffle_seed0 --nodes 6 \\
      --requests 2000 --chaos kill=0.34,stop=1:3,add=2 --out results/swarm
  python -m lsvit.swarm join --address HEAD:6379 --workdir W --layers 0 1 2   (another host)
"""


def _common(ap):
  ap.add_argument("--workdir", nargs="+", required=True,
                  help="training workdirs or converted checkpoints (several: a merged swarm)")
  ap.add_argument("--nodes", type=positive, default=4, help="layer-nodes to start")
  ap.add_argument("--replicas", type=positive, default=1, help="copies of every layer")
  ap.add_argument("--address", help="a Ray cluster's head HOST:PORT (default: Ray on this "
                                    "machine, on loopback)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--name", default="lsvit", help="the swarm's name (nodes join it by name)")


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not the whole usage
    print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
    sys.exit(2)


def parser() -> argparse.ArgumentParser:
  ap = _Parser(prog="python -m lsvit.swarm", description=USAGE,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True)
  s = sub.add_parser("serve", help="start a swarm, send it the eval split, show its nodes live")
  _common(s)
  s.add_argument("--duration", type=float, default=60.0, help="seconds to serve, then stop")
  s.add_argument("--concurrency", type=positive, default=2, help="requests in flight")
  s.add_argument("--kill", default="", help="demo: SIGKILL nodes, N@SECONDS (e.g. 1@5)")
  s.add_argument("--every", type=float, default=2.0, help="seconds between tables")
  b = sub.add_parser("bench", help="a chaos run checked against the offline model, and speed")
  _common(b)
  b.add_argument("--requests", type=positive, default=2000)
  b.add_argument("--chaos", default="kill=0.34,stop=1:3,add=2",
                 help="kill=F (fraction or count), stop=N:SECONDS, add=N, slow=N:FACTOR")
  b.add_argument("--out", required=True, help="new directory for swarm.json and swarm.png")
  b.add_argument("--concurrency", type=positive, default=4)
  b.add_argument("--k", type=positive, nargs="+", help="layers per request, cycled")
  b.add_argument("--batch", type=positive, default=1, help="images per request")
  b.add_argument("--speed_requests", type=int, default=300,
                 help="requests per speed measurement (0: none)")
  j = sub.add_parser("join", help="start a node on this host for a swarm running elsewhere")
  j.add_argument("--address", required=True, help="the Ray cluster's head HOST:PORT")
  j.add_argument("--workdir", required=True, help="where this node's layers come from")
  j.add_argument("--layers", type=int, nargs="+", required=True, help="layer indices to hold")
  j.add_argument("--run", type=int, default=0, help="the run's index in the swarm's --workdir")
  j.add_argument("--name", default="lsvit", help="the swarm's name")
  return ap


def _table(swarm, served: int, errors: int, t0: float) -> str:
  rows = swarm.nodes()
  width = max(len(r["id"]) for r in rows)
  lines = [f"{'node':<{width}}  {'pid':>7}  {'state':<8} {'served':>7} {'failed':>6}  layers"]
  for r in rows:
    layers = " ".join(f"{run}:{layer}" for run, layer in r["layers"])
    lines.append(f"{r['id']:<{width}}  {r['pid']:>7}  {r['state']:<8} {r['served']:>7} "
                 f"{r['failed']:>6}  {layers}")
  elapsed = time.perf_counter() - t0
  lines.append(f"{elapsed:6.1f} s: {served} requests answered ({served / elapsed:.1f}/s), "
               f"{errors} without a live layer")
  return "\n".join(lines)


def serve(args) -> int:
  import threading
  from lsvit.swarm import NoLayersAlive, Swarm, bench, parts
  kills = []
  if args.kill:
    try:
      n, _, at = args.kill.partition("@")
      kills = [(float(at), int(n))]
    except ValueError:
      raise SystemExit(_fail(f"--kill {args.kill!r}: give N@SECONDS, e.g. 1@5"))
  model = parts.load(args.workdir)
  images, labels = bench.eval_split(args.workdir[0])
  with Swarm(model, args.nodes, replicas=args.replicas, address=args.address,
             seed=args.seed, name=args.name) as s:
    print(f"swarm of {args.nodes} nodes up; serving the eval split of {args.workdir[0]} for "
          f"{args.duration:.0f} s", flush=True)
    stop = threading.Event()
    counts = {"served": 0, "errors": 0, "correct": 0}
    lock = threading.Lock()
    t0 = time.perf_counter()

    def worker(w):
      i = w
      while not stop.is_set():
        try:
          r = s.classify(images[i % len(images)][None])
          with lock:  # workers share the counts
            counts["served"] += 1
            counts["correct"] += int(r.logits.argmax() == labels[i % len(images)])
          failed = [h for h in r.hops if h.outcome != "ok"]
          if i < args.concurrency or counts["served"] % 500 == 0 or failed:
            print(f"request {i}: label {labels[i % len(images)]}, predicted "
                  f"{int(r.logits.argmax())}, route {[l for _, l in r.route]}"
                  + "".join(f"; {h.node} {h.outcome} at hop {h.position} (layer {h.layer[1]})"
                            for h in failed)
                  + (f", skipped layers {[l for _, l in r.skipped]}" if r.skipped else ""),
                  flush=True)
        except NoLayersAlive as e:
          with lock:
            counts["errors"] += 1
          print(f"request {i}: {e}", flush=True)
          time.sleep(0.5)
        i += args.concurrency

    threads = [threading.Thread(target=worker, args=(w,), daemon=True)
               for w in range(args.concurrency)]
    for t in threads:
      t.start()
    next_table = 0.0
    while time.perf_counter() - t0 < args.duration:
      elapsed = time.perf_counter() - t0
      for at, n in list(kills):
        if elapsed >= at:
          kills.remove((at, n))
          alive = [r for r in s.nodes() if r["state"] == "alive"][:n]
          for r in alive:
            os.kill(r["pid"], signal.SIGKILL)
            print(f"-- {elapsed:.1f} s: killed {r['id']} (pid {r['pid']}) with SIGKILL",
                  flush=True)
      if elapsed >= next_table:
        print(_table(s, counts["served"], counts["errors"], t0), flush=True)
        next_table += args.every
      time.sleep(0.1)
    stop.set()
    for t in threads:
      t.join(timeout=30)
    print(_table(s, counts["served"], counts["errors"], t0))
    acc = counts["correct"] / max(1, counts["served"])
    print(f"done: {counts['served']} requests answered, accuracy {100 * acc:.1f}%, "
          f"{counts['errors']} could not be served")
  return 0


def join(args) -> int:
  import uuid
  from lsvit.swarm import NODE_PREFIX, start_ray
  ray, _ = start_ray(args.address, f"lsvit-swarm-{args.name}")
  from lsvit.swarm.node import LayerNode
  node_id = f"{NODE_PREFIX}{os.uname().nodename}-{uuid.uuid4().hex[:6]}"
  node_ip = ray.get_runtime_context().get_node_id()
  from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
  handle = ray.remote(max_restarts=0)(LayerNode).options(
      name=node_id, lifetime="detached", num_cpus=0,
      scheduling_strategy=NodeAffinitySchedulingStrategy(node_ip, soft=False)).remote(
      node_id, source=os.path.abspath(args.workdir), indices=args.layers, run=args.run)
  info = ray.get(handle.info.remote())
  print(f"node {node_id} (pid {info['pid']}) holds layers {info['layers']}; the swarm "
        f"'{args.name}' routes to it within one heartbeat. It lives until `ray stop` on this host")
  return 0


def _fail(msg: str) -> int:
  print(f"error: {msg}", file=sys.stderr)
  return 1


def main(argv: Optional[List[str]] = None) -> int:
  args = parser().parse_args(argv)
  from lsvit import checkpoint, data, train_lib
  train_lib.quiet_logs()
  from lsvit.evaluators import EvalError
  from lsvit.swarm import SwarmError
  try:
    if args.address:  # before reading any data: an unreachable cluster is said at once
      from lsvit.swarm import _check_reachable
      _check_reachable(args.address)
    if args.command == "serve":
      return serve(args)
    if args.command == "join":
      return join(args)
    from lsvit.swarm import bench
    bench.run(args.workdir, args.nodes, args.requests, args.chaos, args.out,
              replicas=args.replicas, concurrency=args.concurrency, seed=args.seed, k=args.k,
              speed_requests=args.speed_requests, address=args.address, batch=args.batch,
              name=args.name,
              log=functools.partial(print, flush=True))
    return 0
  except (SwarmError, EvalError, checkpoint.CheckpointError, data.DataError, ValueError,
          FileExistsError, FileNotFoundError) as e:
    return _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def console():
  """``lsvit-swarm`` / ``python -m lsvit.swarm``."""
  code = main()
  from lsvit import checkpoint
  checkpoint.exit_process(code)


if __name__ == "__main__":
  console()
