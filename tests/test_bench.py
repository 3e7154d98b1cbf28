import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import compare_torch as bench
from lsvit import model as model_lib
from tests.helpers import ROOT


def test_flop_formula_matches_the_known_vit_b16_figure():
  # ViT-B/16 at 224: 17.6 G multiply-adds per image (the figure timm/fvcore report as "GFLOPs")
  b16 = dict(width=768, depth=12, mlp_dim=3072, patch_size=16, image_size=224)
  assert abs(bench.forward_macs(b16, classes=1000) / 17.6e9 - 1) < 0.01
  assert bench.train_flops(b16, classes=1000) == 6 * bench.forward_macs(b16, classes=1000)


def test_step_matmuls_are_the_analytic_flops_less_the_patch_convolution():
  # Read off the jaxpr of a real training step: every dot_general of forward and backward.
  s = dict(width=32, depth=3, mlp_dim=64, num_heads=2, patch_size=4, image_size=16)
  model = model_lib.build(dict(s, num_classes=bench.CLASSES, impl="sequential"))
  batch = 5
  dots = bench.step_matmuls(model, jnp.zeros((batch, 16, 16, 3)), jnp.zeros((batch,), jnp.int32),
                            jnp.arange(3))
  # The patch embedding is a convolution, not a dot_general: its multiply-adds per image are
  # patches x (patch_size^2 x channels) x width, and a training step does them 3 times
  # (forward, gradient of the input, gradient of the kernel) at 2 FLOPs each.
  patches, channels = (16 // s["patch_size"]) ** 2, 3
  conv_macs = patches * s["patch_size"] ** 2 * channels * s["width"]
  assert bench.matmul_flops(dots) == batch * (bench.train_flops(s) - 3 * 2 * conv_macs)


@pytest.mark.parametrize("lhs, rhs, dims", [
    ((6, 4), (4, 5), (((1,), (0,)), ((), ()))),
    ((6, 4), (6, 5), (((0,), (0,)), ((), ()))),                   # a weight gradient
    ((2, 3, 4, 5), (2, 7, 4, 5), (((3,), (3,)), ((0, 2), (0, 2)))),  # attention, batch dims inside
])
def test_einsum_spec_is_the_dot_general(lhs, rhs, dims):
  import torch
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=lhs).astype(np.float32), rng.normal(size=rhs).astype(np.float32)
  ours = torch.einsum(bench._einsum_spec(lhs, rhs, dims), torch.from_numpy(a), torch.from_numpy(b))
  np.testing.assert_allclose(ours.numpy(), np.asarray(jax.lax.dot_general(a, b, dims)),
                             rtol=1e-5, atol=1e-5)


def test_profile_step_attributes_ops_and_counts_matmul_flops():
  from bench import profile_step
  a, b = jnp.ones((6, 4)), jnp.ones((4, 5))
  hlo = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(a, b).compile().as_text()
  assert 2 * 6 * 4 * 5 in {flops for _, flops in profile_step.hlo_ops(hlo).values()}
  cat = profile_step.category
  assert cat("jit(step)/jvp(ViT)/Transformer/block/MlpBlock_3/Dense_0/dot_general") == "dense matmuls"
  assert cat("jit(step)/transpose(jvp(ViT))/Transformer/block/MlpBlock_3/Dense_1/transpose") == "dense matmuls"
  assert cat("jit(step)/transpose(jvp(ViT))/Transformer/block/LayerNorm_0/mul") == "LayerNorm"
  assert cat("jit(step)/jvp(ViT)/Transformer/block/MlpBlock_3/erf") == "MLP bias + GELU"
  assert cat("jit(step)/add") == "optimizer (Adam)"


def test_quick_benchmark_runs_and_reports_every_figure(tmp_path):
  out, md = tmp_path / "b.json", tmp_path / "b.md"
  r = subprocess.run([sys.executable, "-m", "bench.compare_torch", "--quick", "--json", str(out),
                      "--markdown", str(md)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.load(open(out))
  (setup,) = res["setups"].values()
  assert setup["compilations"] == 1 and setup["random_orders_run"] > 10
  for key in ("shuffle_overhead", "lsvit_train_img_s", "torch_train_img_s", "lsvit_infer_img_s",
              "torch_infer_img_s", "train_speedup_vs_torch", "mfu"):
    assert np.isfinite(setup[key]["max"]) and setup[key]["min"] > 0, key
  assert 0 < setup["memory_ratio"] < 10 and res["peak_f32_matmul_flops"] > 1e9
  for key in ("xla_matmuls_s", "torch_matmuls_s", "xla_adam_s", "ceiling_vs_torch"):
    assert np.isfinite(setup["floor"][key]["max"]) and setup["floor"][key]["min"] > 0, key
  # the report shows the measured numbers, not only its template
  text = open(md).read()
  assert f"{setup['shuffle_overhead']['median']:.3f}" in text
  assert f"{setup['train_speedup_vs_torch']['median']:.2f}" in text
  assert f"{setup['compilations']} ({setup['random_orders_run']})" in text
