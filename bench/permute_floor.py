"""What `impl='permute'` must pay on XLA CPU: one copy of the block parameters into
execution order (forward) and its inverse (backward), timed alone, beside the plain
model's training step. If the copies alone cost X% of a step, a shuffled step cannot be
faster than 1 + X% of the plain one while a matmul cannot read its weight at a runtime
offset in place.

  python -m bench.permute_floor [--name S/16 --image 224 --batch 4]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import lost_impls, order_impl
from lsvit import model as model_lib


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--name", default="S/16")
  ap.add_argument("--image", type=int, default=224)
  ap.add_argument("--patch", type=int)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--json")
  args = ap.parse_args()
  # The plain model's training step, set up as bench/order_impl.py does.
  _, plain_step, plain_times, _ = order_impl.program("sequential", args, False)
  cfg = dict(name=args.name, image_size=args.image, num_classes=100, impl="permute")
  if args.patch:
    cfg["patch_size"] = args.patch
  shuf = lost_impls.build(cfg)
  stack = model_lib.init_params(shuf)["Transformer"]["encoderblock"]
  order = jnp.asarray(np.random.default_rng(0).permutation(shuf.depth), jnp.int32)

  @jax.jit
  def copies(stack, order):  # forward gather and the backward's inverse gather, nothing else
    out, vjp = jax.vjp(lambda s: lost_impls.permute_layers(s, order), stack)
    return vjp(out)[0]

  jax.block_until_ready(copies(stack, order))
  rows = {"plain_step": plain_times, "copies": []}
  for _ in range(args.steps):  # interleaved
    plain_step(1)
    t = time.perf_counter()
    jax.block_until_ready(copies(stack, order))
    rows["copies"].append(time.perf_counter() - t)
  nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(stack))
  med = {k: float(np.median(v)) for k, v in rows.items()}
  res = {"args": vars(args), "block_param_MiB": nbytes / 2**20, "median_s": med,
         "copies_over_step": med["copies"] / med["plain_step"]}
  print(f"{args.name} @{args.image}, batch {args.batch}: block parameters {nbytes / 2**20:.1f} MiB; "
        f"plain step {med['plain_step'] * 1e3:.1f} ms, gather + inverse gather alone "
        f"{med['copies'] * 1e3:.1f} ms = {100 * res['copies_over_step']:.1f}% of a step")
  if args.json:
    json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
  main()
