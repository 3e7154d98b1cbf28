"""Side-by-side benchmark: lsvit against the PyTorch way of doing LayerShuffle.

One process, same machine, model size, batch and threads. For each setup it reports
1. shuffle overhead: training step with a new random order every step / the plain
   sequential model's step (goal <= 1.02);
2. compilations over 100 steps with 100 random orders passed as data (goal 1);
3. compiled temporary memory, shuffled step / sequential step (goal <= 1.05);
4. training (and inference) images/s of lsvit / a PyTorch reference doing what the
   authors' code does: a `transformers` ViT whose layer list is reordered before
   every step, Adam, torch using all cores (goal >= 1.2);
5. 100 merged models / 100 single-model passes (goal <= 1.1; digits model);
6. training FLOP/s / the peak f32 matmul rate measured here with XLA (goal >= 60%).
   Training FLOPs per image = 3 x forward, forward = 2 x multiply-adds:
   N P^2 C D (patches) + L [T (4 D^2 + 2 D M) + 2 T^2 D] (blocks) + D K (head),
   T = N + 1 tokens, D width, M MLP width, L layers, K classes.
And, to show what figure 4 can reach at all: the floor of a training step on this
machine, every matrix multiply of the step (read off its jaxpr: same shapes and
contractions) run alone, with XLA and with torch, plus the Adam update alone. PyTorch's
step time / the XLA floor is the most lsvit could reach with XLA's kernels.
Every timing is repeated, interleaved between the compared programs; min/median/max.

  python -m bench.compare_torch              # full (a few minutes on 2 cores)
  python -m bench.compare_torch --quick      # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import lost_impls
from lsvit import model as model_lib
from tools import machine

# name -> (model, batch, timed steps per repeat, repeats, random orders for the compile count)
SETUPS = {
    "Ti/16 @32": (dict(width=192, depth=12, mlp_dim=768, num_heads=3, patch_size=16, image_size=32),
                  64, 10, 10, 100),
    "S/16 @224": (dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=16, image_size=224),
                  4, 3, 5, 0),
}
QUICK = {"Ti/4 @32 (quick)": (dict(width=64, depth=4, mlp_dim=128, num_heads=2, patch_size=4,
                                   image_size=32), 16, 3, 2, 10)}
CLASSES = 100


def cores() -> int:
  """Cores this process may use (``taskset -c 0 python -m bench.compare_torch`` compares on one)."""
  return len(machine.usable_cores())


def forward_macs(s, classes=CLASSES) -> float:
  n = (s["image_size"] // s["patch_size"]) ** 2
  t, d, m, l = n + 1, s["width"], s["mlp_dim"], s["depth"]
  return n * s["patch_size"] ** 2 * 3 * d + l * (t * (4 * d * d + 2 * d * m) + 2 * t * t * d) + d * classes


def train_flops(s, classes=CLASSES) -> float:
  """2 FLOPs per multiply-add, training = 3 x forward (backward is twice the forward)."""
  return 3 * 2 * forward_macs(s, classes)


def stats(xs):
  return {"min": float(np.min(xs)), "median": float(np.median(xs)), "max": float(np.max(xs))}


def _interleaved(fns: dict, steps: int, repeats: int) -> dict:
  """Per-step seconds for each fn, timed in turn ``repeats`` times."""
  out = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      f(steps)
      out[k].append((time.perf_counter() - t) / steps)
  return out


# ----------------------------------------------------------------------------- lsvit

def jitted_train_step(model, tx, x, y):
  """step(params, opt_state, order) -> (params, opt_state): forward, backward, optimizer
  update on a fixed batch, the layer order passed as data; buffers donated."""
  def step(params, opt, order):
    def loss(p):
      logits = model.apply({"params": p}, x, order, train=True)["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    g = jax.grad(loss)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt
  return jax.jit(step, donate_argnums=(0, 1))


def lsvit_steps(s, batch, impl="fetch"):
  kw = {k: v for k, v in s.items() if k != "batch"}
  seq = model_lib.build(dict(kw, num_classes=CLASSES, impl="sequential"))
  shuf = lost_impls.build(dict(kw, num_classes=CLASSES, impl=impl))
  params = {"seq": model_lib.init_params(seq), "shuf": model_lib.init_params(shuf)}
  tx = optax.adam(1e-4, eps=1e-6)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, s["image_size"], s["image_size"], 3)),
                  jnp.float32)
  y = jnp.asarray(np.random.default_rng(1).integers(0, CLASSES, batch), jnp.int32)

  return (seq, shuf, params, tx, jitted_train_step(seq, tx, x, y), jitted_train_step(shuf, tx, x, y), x)


def lsvit_programs(s, rng, count_orders, impl="fetch"):
  """Timed closures (n steps each) for lsvit, its compiled memory, and a compile counter."""
  seq, shuf, params, tx, seq_step, shuf_step, x = lsvit_steps(s, s["batch"], impl)
  depth = s["depth"]
  ident = jnp.arange(depth, dtype=jnp.int32)
  state = {k: (p, tx.init(p)) for k, p in params.items()}
  mem = {name: fn.lower(*state[name], ident).compile().memory_analysis().temp_size_in_bytes
         for name, fn in (("seq", seq_step), ("shuf", shuf_step))}
  # warm-up; the shuffled step sees a fresh random order (data) at every call from here on
  p, o = state["shuf"]
  for _ in range(max(count_orders, 1)):
    p, o = shuf_step(p, o, jnp.asarray(rng.permutation(depth), jnp.int32))
  state["shuf"] = jax.block_until_ready((p, o))
  state["seq"] = jax.block_until_ready(seq_step(*state["seq"], ident))
  seen = {"orders": max(count_orders, 1)}

  def train(name, fn, random):
    def go(n):
      p, o = state[name]
      for _ in range(n):
        p, o = fn(p, o, jnp.asarray(rng.permutation(depth), jnp.int32) if random else ident)
      state[name] = jax.block_until_ready((p, o))
      seen["orders"] += n if random else 0
    return go

  infer_fn = jax.jit(lambda p, x, order: shuf.apply({"params": p}, x, order)["logits"])
  jax.block_until_ready(infer_fn(state["shuf"][0], x, ident))

  def infer(n):
    for _ in range(n):
      out = infer_fn(state["shuf"][0], x, jnp.asarray(rng.permutation(depth), jnp.int32))
    jax.block_until_ready(out)

  programs = {"lsvit_sequential": train("seq", seq_step, False),
              "lsvit_shuffled": train("shuf", shuf_step, True), "lsvit_infer": infer}
  return programs, mem, lambda: (shuf_step._cache_size(), seen["orders"])


# ----------------------------------------------------------------------------- step floor

def step_matmuls(model, x, y, order):
  """Every ``dot_general`` of a training step's forward and backward (the patch
  embedding's convolutions, <1% of the FLOPs, left out): [(lhs shape, rhs shape,
  dimension_numbers)], read off the jaxpr of the gradient."""
  from jax.extend import core as jcore

  def loss(p):
    logits = model.apply({"params": p}, x, order, train=True)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  params = jax.eval_shape(lambda: model_lib.init_params(model))
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append((eqn.invars[0].aval.shape, eqn.invars[1].aval.shape,
                      eqn.params["dimension_numbers"]))
      for v in eqn.params.values():
        for sub in v if isinstance(v, (list, tuple)) else [v]:
          if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
            walk(getattr(sub, "jaxpr", sub))

  walk(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  return found


def matmul_flops(dots) -> float:
  total = 0
  for lhs, rhs, ((lc, rc), (lb, rb)) in dots:
    batch = np.prod([lhs[i] for i in lb])
    free_l = np.prod([d for i, d in enumerate(lhs) if i not in lc and i not in lb])
    free_r = np.prod([d for i, d in enumerate(rhs) if i not in rc and i not in rb])
    total += 2 * batch * free_l * free_r * np.prod([lhs[i] for i in lc])
  return float(total)


def _einsum_spec(lhs, rhs, dims):
  """dot_general dimension numbers -> the einsum subscripts torch understands."""
  (lc, rc), (lb, rb) = dims
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  a = [next(letters) for _ in lhs]
  b = [None] * len(rhs)
  for i, j in zip(lc + lb, rc + rb):
    b[j] = a[i]
  b = [c or next(letters) for c in b]
  out = ([a[i] for i in lb] + [c for i, c in enumerate(a) if i not in lc and i not in lb]
         + [c for j, c in enumerate(b) if j not in rc and j not in rb])
  return f"{''.join(a)},{''.join(b)}->{''.join(out)}"


def floor_programs(s):
  """Timed closures: the plain model's training-step matmuls alone under XLA and under
  torch, and the Adam update alone (XLA). The matmuls are independent, so each library
  may run them concurrently: a lower bound on any step that has to do them."""
  import torch
  torch.set_num_threads(cores())
  model, _, params, tx, _, _, x = lsvit_steps(s, s["batch"])  # the plain model's set-up
  params = params["seq"]
  y = jnp.zeros((s["batch"],), jnp.int32)
  dots = step_matmuls(model, x, y, jnp.arange(s["depth"], dtype=jnp.int32))
  rng = np.random.default_rng(0)
  ins = [(rng.normal(size=l).astype(np.float32), rng.normal(size=r).astype(np.float32))
         for l, r, _ in dots]
  xla_ins = jax.device_put(ins)
  mm = jax.jit(lambda ins: [jax.lax.dot_general(a, b, d) for (a, b), (_, _, d) in zip(ins, dots)])
  jax.block_until_ready(mm(xla_ins))
  specs = [_einsum_spec(l, r, d) for l, r, d in dots]
  t_ins = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in ins]
  grads = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), params)
  adam = jax.jit(lambda p, o, g: (lambda u, o: (optax.apply_updates(p, u), o))(*tx.update(g, o, p)),
                 donate_argnums=(0, 1))
  state = [jax.tree.map(jnp.copy, params)]
  state.append(tx.init(state[0]))
  state[:] = jax.block_until_ready(adam(*state, grads))

  def xla_mm(n):
    for _ in range(n):
      out = mm(xla_ins)
    jax.block_until_ready(out)

  def torch_mm(n):
    with torch.no_grad():
      for _ in range(n):
        for spec, (a, b) in zip(specs, t_ins):
          torch.einsum(spec, a, b)

  def xla_adam(n):
    for _ in range(n):
      state[:] = adam(*state, grads)
    jax.block_until_ready(state)

  torch_mm(1)
  return ({"floor_xla_matmuls": xla_mm, "floor_torch_matmuls": torch_mm, "floor_xla_adam": xla_adam},
          matmul_flops(dots), len(dots))


# ----------------------------------------------------------------------------- PyTorch reference

def torch_programs(s, rng):
  import torch
  from transformers import ViTConfig, ViTForImageClassification
  torch.set_num_threads(cores())
  cfg = ViTConfig(hidden_size=s["width"], num_hidden_layers=s["depth"], num_attention_heads=s["num_heads"],
                  intermediate_size=s["mlp_dim"], image_size=s["image_size"], patch_size=s["patch_size"],
                  num_labels=CLASSES, layer_norm_eps=1e-6)
  model = ViTForImageClassification(cfg)
  layers = list(model.vit.layers)
  opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-6)
  g = torch.Generator().manual_seed(0)
  x = torch.randn(s["batch"], 3, s["image_size"], s["image_size"], generator=g)
  y = torch.randint(0, CLASSES, (s["batch"],), generator=g)

  def reorder():  # what the authors' code does before every forward pass
    model.vit.layers = torch.nn.ModuleList([layers[i] for i in rng.permutation(len(layers))])

  def train(n):
    model.train()
    for _ in range(n):
      reorder()
      loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()

  def infer(n):
    model.eval()
    with torch.no_grad():
      for _ in range(n):
        reorder()
        model(pixel_values=x)

  train(2), infer(1)  # warm-up
  return {"torch_train": train, "torch_infer": infer}, torch.__version__


# ----------------------------------------------------------------------------- peak matmul, merge

def peak_matmul(n=2048, repeats=5):
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, a))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a, a))
    ts.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(ts)


def bench_merge(models, repeats):
  import subprocess
  import tempfile
  out = os.path.join(tempfile.mkdtemp(), "merge.json")
  subprocess.run([sys.executable, "-m", "bench.merge_eval", "--models", str(models), "--repeats", str(repeats),
                  "--json", out], check=True, capture_output=True)
  return json.load(open(out))


# ----------------------------------------------------------------------------- report

def run(setups, merge_models, merge_repeats, impl="fetch"):
  rng = np.random.default_rng(0)
  peak = peak_matmul()
  results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": cores(),
                         "python": platform.python_version(), "jax": jax.__version__,
                         "device": str(jax.devices()[0])},
             "peak_f32_matmul_flops": peak, "impl": impl, "setups": {}}
  for name, (model, batch, steps, repeats, count_orders) in setups.items():
    s = dict(model, batch=batch)
    print(f"== {name}: width {s['width']}, depth {s['depth']}, batch {batch}", flush=True)
    lsvit, mem, counter = lsvit_programs(s, rng, count_orders, impl)
    torch_p, torch_version = torch_programs(s, rng)
    floor, mm_flops, mm_count = floor_programs(s)
    t = {k: np.asarray(v) for k, v in _interleaved({**lsvit, **torch_p, **floor}, steps,
                                                    repeats).items()}
    compiles, orders_seen = counter()
    results["machine"]["torch"] = torch_version
    b = batch
    seq, shuf = t["lsvit_sequential"], t["lsvit_shuffled"]
    r = {
        "setup": s,
        "shuffle_overhead": stats(shuf / seq),
        "compilations": compiles, "random_orders_run": orders_seen,
        "steps_per_repeat": steps, "repeats": repeats,
        "memory_ratio": mem["shuf"] / mem["seq"], "temp_bytes": mem,
        "lsvit_train_img_s": stats(b / shuf), "torch_train_img_s": stats(b / t["torch_train"]),
        "lsvit_infer_img_s": stats(b / t["lsvit_infer"]), "torch_infer_img_s": stats(b / t["torch_infer"]),
        "train_flops_per_image": train_flops(s),
        "seconds": {k: v.tolist() for k, v in t.items()},
    }
    r["train_speedup_vs_torch"] = stats(t["torch_train"] / shuf)
    r["infer_speedup_vs_torch"] = stats(t["torch_infer"] / t["lsvit_infer"])
    r["mfu"] = stats(train_flops(s) * b / shuf / peak)
    floor_s = t["floor_xla_matmuls"] + t["floor_xla_adam"]
    r["floor"] = {"matmuls": mm_count, "matmul_flops": mm_flops,
                  "xla_matmuls_s": stats(t["floor_xla_matmuls"]),
                  "torch_matmuls_s": stats(t["floor_torch_matmuls"]),
                  "xla_adam_s": stats(t["floor_xla_adam"]),
                  "xla_matmul_flops_per_s": stats(mm_flops / t["floor_xla_matmuls"]),
                  "torch_matmul_flops_per_s": stats(mm_flops / t["floor_torch_matmuls"]),
                  # the most figure 4 could be with XLA's kernels: nothing but matmuls and Adam
                  "ceiling_vs_torch": stats(t["torch_train"] / floor_s)}
    results["setups"][name] = r
    print(json.dumps({k: v for k, v in r.items() if k != "setup"}, indent=1), flush=True)
  if merge_models:
    results["merge"] = bench_merge(merge_models, merge_repeats)
  return results


def _ms(st):
  return {k: v * 1e3 for k, v in st.items()}


def markdown(res) -> str:
  m = res["machine"]
  f = lambda s, p=3: f"{s['min']:.{p}f} / {s['median']:.{p}f} / {s['max']:.{p}f}"
  lines = [f"lsvit impl `{res['impl']}`. Machine: {m['cpu']}, {m['cores']} cores, {m['device']}; Python {m['python']}, "
           f"jax {m['jax']}, torch {m.get('torch')}. Peak f32 matmul (XLA, 2048²): "
           f"{res['peak_f32_matmul_flops'] / 1e9:.1f} GFLOP/s.", "",
           "| figure (min / median / max over repeats) | goal | " +
           " | ".join(res["setups"]) + " |", "|---|---|" + "---|" * len(res["setups"])]
  rows = [("1. shuffled ÷ sequential step time", "≤ 1.02", lambda r: f(r["shuffle_overhead"])),
          ("2. compilations (random orders run)", "1", lambda r: f"{r['compilations']} ({r['random_orders_run']})"),
          ("3. temp memory shuffled ÷ sequential", "≤ 1.05", lambda r: f"{r['memory_ratio']:.3f}"),
          ("4. training speed lsvit ÷ PyTorch", "≥ 1.2", lambda r: f(r["train_speedup_vs_torch"], 2)),
          ("   lsvit training images/s", "", lambda r: f(r["lsvit_train_img_s"], 1)),
          ("   PyTorch training images/s", "", lambda r: f(r["torch_train_img_s"], 1)),
          ("   inference lsvit ÷ PyTorch", "", lambda r: f(r["infer_speedup_vs_torch"], 2)),
          ("   lsvit inference images/s", "", lambda r: f(r["lsvit_infer_img_s"], 1)),
          ("   PyTorch inference images/s", "", lambda r: f(r["torch_infer_img_s"], 1)),
          ("   floor: the step's matmuls alone, XLA, ms", "",
           lambda r: f(_ms(r["floor"]["xla_matmuls_s"]), 1)),
          ("   … the same matmuls alone, torch, ms", "",
           lambda r: f(_ms(r["floor"]["torch_matmuls_s"]), 1)),
          ("   … Adam update alone, XLA, ms", "", lambda r: f(_ms(r["floor"]["xla_adam_s"]), 1)),
          ("   ceiling: PyTorch step ÷ (XLA matmuls + Adam)", "≥ 1.2 to be reachable",
           lambda r: f(r["floor"]["ceiling_vs_torch"], 2)),
          ("6. training FLOP/s ÷ peak matmul", "≥ 0.60", lambda r: f(r["mfu"], 3))]
  for label, goal, fn in rows:
    lines.append(f"| {label} | {goal} | " + " | ".join(fn(r) for r in res["setups"].values()) + " |")
  if "merge" in res:
    mg = res["merge"]
    lines.append(f"| 5. {mg['models']} merged ÷ {mg['models']} single passes (digits) | ≤ 1.1 | "
                 f"{min(mg['ratio']):.3f} / {mg['ratio_median']:.3f} / {max(mg['ratio']):.3f} "
                 f"({mg['compilations_during_timing']} compilations) |" + " |" * (len(res["setups"]) - 1))
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
  ap.add_argument("--impl", default="fetch", help="lsvit's order implementation (model.impl)")
  ap.add_argument("--setup", choices=list(SETUPS), action="append",
                  help="only these setups (repeatable); default all, and the merge figure")
  ap.add_argument("--json", default="bench/results/bench.json")
  ap.add_argument("--markdown", default="bench/results/bench.md")
  args = ap.parse_args(argv)
  if args.quick:
    res = run(QUICK, merge_models=0, merge_repeats=1, impl=args.impl)
  else:
    chosen = {k: v for k, v in SETUPS.items() if not args.setup or k in args.setup}
    res = run(chosen, merge_models=0 if args.setup else 100, merge_repeats=3, impl=args.impl)
  os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
  json.dump(res, open(args.json, "w"), indent=1)
  md = markdown(res)
  open(args.markdown, "w").write(md + "\n")
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
