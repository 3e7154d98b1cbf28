"""Where a training step's time goes on XLA CPU: a ``jax.profiler`` trace of the bench's
step (forward, backward, Adam), each executed op's time summed by what it computes.

Ops are attributed through the ``op_name`` XLA keeps from the JAX program (which module
and primitive an op came from, ``transpose(...)`` for the backward); a matmul's rate is
its FLOPs, counted from the compiled HLO, over its time. With ``taskset -c 0`` every op
runs on one core, so the times add up to the step; on more cores ops overlap.

  taskset -c 0 python -m bench.profile_step --setup "Ti/16 @32" [--impl sequential]
"""
import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import compare_torch as bench

CATEGORIES = [  # first match wins
    ("dense matmuls", r"/(query|key|value|out|Dense_\d)/(dot_general|transpose)"),
    ("attention (scores, softmax, heads' layout)", r"MultiHeadDotProductAttention"),
    ("MLP bias + GELU", r"MlpBlock"),
    ("LayerNorm", r"LayerNorm"),
    ("residual adds", r"Transformer/block/add|encoderblock.*/add"),
    ("patch embedding", r"embedding"),
    ("optimizer (Adam)", r"^(?!.*(jvp|transpose)\().*"),
]


def category(op_name: str) -> str:
  return next(c for c, rx in CATEGORIES + [("other", "")] if re.search(rx, op_name))


def hlo_ops(hlo: str) -> dict:
  """Executed op name -> (op_name metadata, matmul FLOPs) from compiled HLO text."""
  shapes, comps, cur = {}, collections.defaultdict(list), None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      cur = m.group(1)
      continue
    if cur:
      comps[cur].append(line)
      m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]", line)
      if m:
        shapes[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]

  def dot_flops(line):
    m = re.match(r"\s+(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), .*"
                 r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if not m:
      return 0
    out = [int(d) for d in m.group(1).split(",") if d]
    k = np.prod([shapes[m.group(2)][int(i)] for i in m.group(3).split(",")])
    return 2 * int(np.prod(out)) * int(k)

  ops = {}
  for lines in comps.values():
    for line in lines:
      m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = .*op_name=\"([^\"]+)\"", line)
      if not m:
        continue
      called = re.search(r"calls=%([\w.\-]+)", line)
      flops = (sum(dot_flops(l) for l in comps.get(called.group(1), [])) if called
               else dot_flops(line))
      ops[m.group(1)] = (m.group(2), flops)
  return ops


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--setup", default="Ti/16 @32", choices=list(bench.SETUPS))
  ap.add_argument("--impl", default="sequential", help="'sequential' (the plain model) or an impl")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--top", type=int, default=12, help="also list the N most expensive ops")
  args = ap.parse_args()
  model, batch = bench.SETUPS[args.setup][:2]
  key = "seq" if args.impl == "sequential" else "shuf"
  _, _, params, tx, seq_step, shuf_step, _ = bench.lsvit_steps(
      dict(model), batch, "fetch" if key == "seq" else args.impl)
  step = seq_step if key == "seq" else shuf_step
  p, o = params[key], tx.init(params[key])
  order = jnp.arange(model["depth"], dtype=jnp.int32)
  ops = hlo_ops(step.lower(p, o, order).compile().as_text())
  for _ in range(3):
    p, o = step(p, o, order)
  jax.block_until_ready(p)
  t = time.perf_counter()
  for _ in range(args.steps):
    p, o = step(p, o, order)
  jax.block_until_ready(p)
  wall = (time.perf_counter() - t) / args.steps
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      p, o = step(p, o, order)
    jax.block_until_ready(p)
  events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.json.gz", recursive=True)[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in ops:
      per_op[e["name"]] += e["dur"] / 1e3 / args.steps  # ms per step
  cat_ms, cat_flops = collections.Counter(), collections.Counter()
  for name, ms in per_op.items():
    op_name, flops = ops[name]
    cat = category(op_name)
    cat_ms[cat] += ms
    cat_flops[cat] += flops
  print(f"{args.setup}, batch {batch}, {args.impl}: {wall * 1e3:.1f} ms per step (wall), "
        f"{sum(cat_ms.values()):.1f} ms of ops, {bench.cores()} core(s)")
  for cat, ms in cat_ms.most_common():
    rate = f"  {cat_flops[cat] / ms / 1e6:6.1f} GFLOP/s" if cat_flops[cat] else ""
    print(f"  {ms:7.2f} ms  {cat}{rate}")
  by_name = collections.defaultdict(lambda: [0.0, 0, 0])  # the same op in every layer, summed
  for name, ms in per_op.items():
    op_name, flops = ops[name]
    entry = by_name[re.sub(r"^jit\(step\)/", "", op_name)]
    entry[0] += ms
    entry[1] += 1
    entry[2] += flops
  print("most expensive ops, summed over layers (ms per step, count, op_name):")
  for op_name, (ms, count, flops) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:args.top]:
    rate = f" {flops / ms / 1e6:6.1f} GFLOP/s" if flops else " " * 15
    print(f"  {ms:6.2f} ms x{count:<3d}{rate}  {op_name[:90]}")


if __name__ == "__main__":
  main()
