"""How to run layers in a runtime order: 'fetch', 'permute', 'gather' (scan), 'unrolled', 'switch'
vs the plain sequential model.

Measures, in one process, training-step time (forward+backward+Adam) and XLA's compiled
temporary memory, for each implementation, at the same model, batch and threads. All
programs are compiled first, then timed in interleaved rounds (``--repeats`` rounds of
``--steps`` steps each), so that drifts of this shared machine hit them alike; min / median /
max over all timed steps. The sequential model is the reference (ratio 1.0).

  python -m bench.order_impl [--name S/16 --image 224 --batch 8 --steps 3 --repeats 5] [--json out.json]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import compare_torch as bench
from bench import lost_impls
from lsvit import model as model_lib


ROWS = [("sequential", False), ("gather", False), ("gather", True), ("unrolled", True),
        ("permute", True), ("fetch", True), ("switch", True)]


def program(impl, args, shuffle):
  cfg = dict(name=args.name, image_size=args.image, num_classes=100, impl=impl)
  if args.patch:
    cfg["patch_size"] = args.patch
  m = lost_impls.build(cfg)
  params = model_lib.init_params(m)
  tx = optax.adam(1e-4)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, args.image, args.image, 3)),
                  jnp.float32)
  y = jnp.zeros((args.batch,), jnp.int32)
  fn = bench.jitted_train_step(m, tx, x, y)
  rng = np.random.default_rng(0)
  next_order = lambda: jnp.asarray(rng.permutation(m.depth) if shuffle else np.arange(m.depth),
                                   jnp.int32)
  opt = tx.init(params)
  mem = fn.lower(params, opt, next_order()).compile().memory_analysis()
  state = list(fn(params, opt, next_order()))  # compile + warm up
  jax.block_until_ready(state)
  times = []

  def run(steps):
    for _ in range(steps):
      t = time.perf_counter()
      state[:] = fn(*state, next_order())
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)

  row = {"impl": impl, "shuffle": shuffle, "temp_bytes": int(mem.temp_size_in_bytes)}
  return row, run, times, fn


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--name", default="Ti/16")
  ap.add_argument("--image", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
  ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  ap.add_argument("--patch", type=int)
  ap.add_argument("--json")
  args = ap.parse_args()
  progs = [program(impl, args, shuffle) for impl, shuffle in ROWS]
  for _ in range(args.repeats):
    for _, run, _, _ in progs:
      run(args.steps)
  rows = []
  for row, _, times, fn in progs:
    row.update(step_s_min=float(np.min(times)), step_s_median=float(np.median(times)),
               step_s_max=float(np.max(times)), compilations=fn._cache_size())
    rows.append(row)
  ref = rows[0]
  print(f"{args.name} at {args.image}, batch {args.batch}, {jax.devices()[0].platform}, "
        f"jax {jax.__version__}, {args.repeats} interleaved rounds of {args.steps} steps")
  print(f"{'impl':<11}{'order':<9}{'step ms (min/med/max)':<26}{'time ratio':>11}"
        f"{'temp MiB':>10}{'mem ratio':>10}")
  for r in rows:
    r["time_ratio"] = r["step_s_median"] / ref["step_s_median"]
    r["mem_ratio"] = r["temp_bytes"] / ref["temp_bytes"]
    print(f"{r['impl']:<11}{'shuffled' if r['shuffle'] else 'original':<9}"
          f"{r['step_s_min'] * 1e3:7.1f} /{r['step_s_median'] * 1e3:7.1f} /{r['step_s_max'] * 1e3:7.1f}  "
          f"{r['time_ratio']:>10.3f}{r['temp_bytes'] / 2**20:>10.1f}{r['mem_ratio']:>10.3f}")
  if args.json:
    json.dump({"args": vars(args), "rows": rows}, open(args.json, "w"), indent=2)


if __name__ == "__main__":
  main()
