"""Cost of evaluating merged models vs single-model passes (same process, same data).

Builds M=L runs of the digits model (random parameters: speed does not depend on
training), then times, over the 359 validation digits:
  A. N evaluations of one run (N single-model passes, original order);
  B. N merged models, each assembled by indexing the stacked parameters and evaluated.
Reports B / A (goal <= 1.1) and the number of XLA compilations in each part.

  python -m bench.merge_eval [--models 100] [--repeats 3] [--json out.json]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import digits
from lsvit import evaluators as E
from lsvit import model as model_lib
from lsvit import train_lib


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", type=int, default=100)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--json")
  args = ap.parse_args()
  config = digits.get_config()
  mcfg = train_lib.model_config(config, 10)
  model = model_lib.build(mcfg)
  cfg = json.loads(json.dumps(config.to_dict(), default=str))
  runs = [E.TrainedRun(f"run{i}", cfg, mcfg, jax.device_get(model_lib.init_params(model, i)), {})
          for i in range(model.depth)]
  ev = E.Context(runs, progress=False)
  order = np.arange(model.depth)[None]
  stacked = ev.placement.replicate(E.stack_params([r.params for r in runs]))
  sources = E.merge_sources(np.random.default_rng(0), len(runs), model.depth, args.models, False)
  single = ev.device_params(runs[0])
  ev.evaluate(runs[0], order)  # compile the eval step once, outside the timings
  jax.block_until_ready(E.merge_params(stacked, jnp.asarray(sources[0]), jnp.asarray(0)))
  c0 = ev.compilations() + E.merge_params._cache_size()
  a_times, b_times = [], []
  for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
    t = time.perf_counter()
    for i in range(args.models):
      ev.evaluate(runs[0], order, params=single)
    a_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(args.models):
      params = E.merge_params(stacked, jnp.asarray(sources[i]), jnp.asarray(i % len(runs)))
      ev.evaluate(runs[0], order, params=params)
    b_times.append(time.perf_counter() - t)
  compiled = ev.compilations() + E.merge_params._cache_size() - c0
  ratios = [b / a for a, b in zip(a_times, b_times)]
  res = {"models": args.models, "repeats": args.repeats, "device": jax.devices()[0].platform,
         "single_s": a_times, "merged_s": b_times, "ratio": ratios,
         "ratio_median": float(np.median(ratios)), "compilations_during_timing": compiled,
         "model": f"L{model.depth} D{model.width}, 359 images, batch {config.eval_batch_size}"}
  print(f"{args.models} single-model passes: {np.median(a_times):.2f} s (median of {args.repeats})")
  print(f"{args.models} merged models:       {np.median(b_times):.2f} s")
  print(f"ratio merged / single: min {min(ratios):.3f}  median {np.median(ratios):.3f}  "
        f"max {max(ratios):.3f}; compilations while timing: {compiled}")
  if args.json:
    json.dump(res, open(args.json, "w"), indent=2)


if __name__ == "__main__":
  main()
