import json
import subprocess
import sys

from lsvit import bench
from tests.conftest import ROOT


def test_flop_formula_matches_the_known_vit_b16_figure():
  # ViT-B/16 at 224: 17.6 G multiply-adds per image (the figure timm/fvcore report as "GFLOPs")
  b16 = dict(width=768, depth=12, mlp_dim=3072, patch_size=16, image_size=224)
  assert abs(bench.forward_macs(b16, classes=1000) / 17.6e9 - 1) < 0.01
  assert bench.train_flops(b16, classes=1000) == 6 * bench.forward_macs(b16, classes=1000)


def test_quick_benchmark_runs_and_reports_every_figure(tmp_path):
  out, md = tmp_path / "b.json", tmp_path / "b.md"
  r = subprocess.run([sys.executable, "-m", "lsvit.bench", "--quick", "--json", str(out),
                      "--markdown", str(md)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.load(open(out))
  (setup,) = res["setups"].values()
  assert setup["compilations"] == 1 and setup["random_orders_run"] > 10
  for key in ("shuffle_overhead", "lsvit_train_img_s", "torch_train_img_s", "lsvit_infer_img_s",
              "torch_infer_img_s", "train_speedup_vs_torch", "mfu"):
    s = setup[key]
    assert 0 < s["min"] <= s["median"] <= s["max"], key
  assert 0 < setup["memory_ratio"] < 10 and res["peak_f32_matmul_flops"] > 1e9
  assert "| 1. shuffled ÷ sequential step time | ≤ 1.02 |" in open(md).read()
