"""Evaluation on small models trained on the real digits (trained once per session)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from lsvit import cli
from lsvit import evaluators as E
from lsvit import train_lib
from tests.helpers import tiny_config

DEPTH = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A sequential baseline, then (as in the paper) 4 LayerShuffle runs (seeds 0-3) and a
  predict run refined from it: depth 4, width 32."""
  root = tmp_path_factory.mktemp("runs")
  quiet = lambda *a: None
  base = str(root / "baseline_seed0")
  train_lib.train_and_evaluate(tiny_config(variant="baseline", num_epochs=10,
                                           **{"optimizer.lr": 3e-3}), base, log=quiet)
  dirs = {"baseline": [base]}
  for variant, seed in [("layershuffle", s) for s in range(4)] + [("predict", 0)]:
    wd = str(root / f"{variant}_seed{seed}")
    train_lib.train_and_evaluate(tiny_config(variant=variant, seed=seed, num_epochs=10, init_from=base,
                                             **{"optimizer.lr": 3e-3}), wd, log=quiet)
    dirs.setdefault(variant, []).append(wd)
  return root, dirs


def evaluator(runs):
  return E.Context(runs, progress=False)


def test_baseline_collapses_under_shuffling_layershuffle_does_not(trained):
  _, dirs = trained
  runs = E.load_runs(dirs["baseline"] + dirs["layershuffle"])
  ev = evaluator(runs)
  seq = E.get("sequential")(ev, runs)
  arb = E.get("arbitrary", orders=2)(ev, runs)
  base = [r for r in arb["runs"] if r["setting"].startswith("baseline")][0]
  base_seq = [r for r in seq["runs"] if r["setting"].startswith("baseline")][0]
  ls = [r["arbitrary"]["top1"] for r in arb["runs"] if r["setting"].startswith("layershuffle")]
  assert base_seq["sequential"]["top1"] - base["arbitrary"]["top1"] > 0.4
  assert min(ls) - base["arbitrary"]["top1"] > 0.25
  s = arb["settings"]
  assert len(s) == 2 and [v["arbitrary"]["top1"]["n"] for v in s.values()] == [1, 4]


def test_prune_all_layers_in_original_order_equals_sequential(trained):
  _, dirs = trained
  runs = E.load_runs(dirs["layershuffle"][:1])
  ev = evaluator(runs)
  seq = E.get("sequential")(ev, runs)["runs"][0]["sequential"]
  pr = E.get("prune", ks=[2, DEPTH], draws=2)(ev, runs)["runs"][0]
  assert pr[f"k{DEPTH}_sequential"]["top1"] == seq["top1"]
  assert pr[f"k{DEPTH}_sequential"]["loss"] == pytest.approx(seq["loss"], rel=1e-6)
  assert pr["k2_sequential"]["top1"] < seq["top1"]  # fewer layers cost accuracy
  with pytest.raises(E.EvalError, match=r"cannot keep k=\[5\] layers"):
    E.get("prune", ks=[5])(ev, runs)


def test_merge_params_takes_layer_l_from_its_source_run():
  rng = np.random.default_rng(0)
  runs = [{"Transformer": {"encoderblock": {"w": rng.normal(size=(4, 3)).astype(np.float32)}},
           "head": {"k": rng.normal(size=(2,)).astype(np.float32)}}
          for _ in range(5)]
  stacked = jax.tree.map(lambda *a: np.stack(a), *runs)
  sources, base = np.array([3, 0, 4, 1]), 2
  merged = jax.device_get(E.merge_params(stacked, sources, base))
  for l, m in enumerate(sources):
    np.testing.assert_array_equal(merged["Transformer"]["encoderblock"]["w"][l],
                                  runs[m]["Transformer"]["encoderblock"]["w"][l])
  np.testing.assert_array_equal(merged["head"]["k"], runs[base]["head"]["k"])
  s = E.merge_sources(np.random.default_rng(0), 12, 12, 50, False)
  assert all(len(set(row)) == 12 for row in s)  # no two layers from the same run
  with pytest.raises(E.EvalError, match="at least 12 runs"):
    E.merge_sources(np.random.default_rng(0), 5, 12, 1, False)
  assert E.merge_sources(np.random.default_rng(0), 5, 12, 1, True).shape == (1, 12)


def test_merging_copies_of_one_run_equals_that_run(trained, tmp_path):
  _, dirs = trained
  copies = []
  for i in range(DEPTH):
    copies.append(str(tmp_path / f"copy{i}"))
    shutil.copytree(dirs["layershuffle"][0], copies[-1])
  runs = E.load_runs(copies)
  ev = evaluator(runs)
  res = E.get("merge", merges=3)(ev, runs)
  assert res["order"] == "arbitrary"
  assert [m["top1"] for m in res["models"]] == [res["originals"]["top1"]["mean"]] * 3


def test_merging_layershuffle_runs_keeps_accuracy_with_few_compilations(trained):
  _, dirs = trained
  runs = E.load_runs(dirs["layershuffle"])
  ev = evaluator(runs)
  res = E.get("merge", merges=6)(ev, runs)
  assert all(len(set(m["sources"])) == DEPTH for m in res["models"])
  assert res["merged"]["top1"]["mean"] > 0.3  # far above chance (0.1)
  assert res["compilations"] <= 2  # one eval program (one order length) + the merge gather


def test_ensemble_of_one_run_equals_that_run(trained):
  _, dirs = trained
  runs = E.load_runs(dirs["layershuffle"][:1])
  ev = evaluator(runs)
  res = E.get("ensemble", orders=2)(ev, runs)
  assert res["ensemble"]["top1"] == res["single"]["top1"]["mean"]
  assert res["ensemble"]["top5"] == res["single"]["top5"]["mean"]
  both = E.get("ensemble", orders=1)(ev, E.load_runs(dirs["layershuffle"]))
  assert both["ensemble"]["top1"] > both["single"]["top1"]["mean"]  # paper: ensemble > single


def test_position_accuracy_synthetic_and_trained(trained):
  _, dirs = trained
  run = E.load_runs(dirs["predict"])[0]
  ev = evaluator([run])
  # Synthetic: layer l's position head ignores its input and always says "l".
  params = jax.tree.map(np.asarray, run.params)
  head = params["Transformer"]["encoderblock"]["PositionHead_Dense"]
  head["kernel"] = np.zeros_like(head["kernel"])
  head["bias"] = 10 * np.eye(DEPTH, dtype=np.float32)
  synthetic = E.TrainedRun(run.workdir, run.config, run.model_cfg, params, run.meta)
  m = ev.evaluate(synthetic, np.arange(DEPTH)[None])
  assert m["position_accuracy"] == 1.0 and m["position_accuracy_per_position"] == [1.0] * DEPTH
  m = ev.evaluate(synthetic, np.arange(DEPTH)[::-1].copy()[None])
  assert m["position_accuracy"] == 0.0  # layer l sits at position L-1-l != l
  res = E.get("position", orders=1)(ev, [run])
  assert res["position_accuracy"]["mean"] > 0.5 and len(res["per_position"]) == DEPTH
  with pytest.raises(E.EvalError, match="needs LayerShuffle-predict runs"):
    E.get("position")(ev, E.load_runs(dirs["baseline"]))


def test_bad_input(trained, tmp_path):
  _, dirs = trained
  with pytest.raises(E.EvalError, match="one architecture and variant; these differ in: variant="):
    runs = E.load_runs(dirs["baseline"] + dirs["layershuffle"][:3])
    E.get("merge", merges=1)(evaluator(runs), runs)
  with pytest.raises(E.EvalError, match="no workdir matches"):
    E.load_runs([str(tmp_path / "nothing*")])
  os.makedirs(tmp_path / "empty")
  with pytest.raises(E.EvalError, match="not a training workdir"):
    E.load_runs([str(tmp_path / "empty")])
  half = tmp_path / "half"
  shutil.copytree(dirs["baseline"][0], half)
  shutil.rmtree(half / "best")
  from lsvit.checkpoint import CheckpointError
  with pytest.raises(CheckpointError, match="has no best checkpoint"):
    E.load_runs([str(half)])
  ev = evaluator(E.load_runs(dirs["baseline"]))
  with pytest.raises(ValueError, match=r"out-of-range entries \[4\]"):  # never clamped in jit
    ev.evaluate(E.load_runs(dirs["baseline"])[0], np.array([[0, 1, 2, 4]]))
  with pytest.raises(ValueError, match="must contain integer"):
    ev.evaluate(E.load_runs(dirs["baseline"])[0], np.array([[0.0, 1.0, 2.0, 3.0]]))
  with pytest.raises(E.EvalError, match="unknown mode 'merged'"):
    E.run(dirs["baseline"], "merged")


def test_an_option_a_mode_does_not_take_is_an_error(trained, capsys):
  """Each evaluator is built from its own options: a mistyped or misplaced one is refused,
  before any checkpoint is loaded, naming what the mode takes."""
  with pytest.raises(E.EvalError, match="mode arbitrary takes no option merges; it takes: orders"):
    E.get("arbitrary", merges=3)
  with pytest.raises(E.EvalError, match="takes no option order; it takes: ks, method, draws"):
    E.run(["/nonexistent"], {"prune": {"order": 2}})
  for bad, want in (({"orders": 0}, "orders=0"), ({"orders": 2.5}, "orders=2.5"),
                    ({"orders": True}, "orders=True")):
    with pytest.raises(E.EvalError, match=want):
      E.get("arbitrary", **bad)
  with pytest.raises(E.EvalError, match="prune method 'middle'"):
    E.get("prune", method="middle")
  _, dirs = trained
  assert cli.evaluate(["--mode", "arbitrary", "--merges", "3", "--workdir",
                       dirs["baseline"][0]]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: --merges does not apply to --mode arbitrary (its options: --orders)"]


@pytest.mark.slow
def test_cli_all_writes_tables_json_and_figures(trained, tmp_path, capsys):
  root, dirs = trained
  out = tmp_path / "out"
  rc = cli.evaluate(["--mode", "all", "--workdir", str(root / "*"), "--out", str(out),
                          "--merges", "3", "--images", "40", "--orders", "1", "--prune_k", "2", "4",
                          "--prune_draws", "1", "--no_progress"])
  assert rc == 0
  files = set(os.listdir(out))
  for m in ("sequential", "arbitrary", "prune", "merge", "ensemble", "position", "analysis"):
    assert f"{m}.json" in files and f"{m}.md" in files, m
  assert {"prune.png", "analysis_umap.png", "analysis_contributions.png", "tables.md"} <= files
  merge = json.load(open(out / "merge.json"))
  assert merge["runs"] == 4 and len(merge["models"]) == 3
  analysis = json.load(open(out / "analysis.json"))
  assert [sum(r["positions_seen"]) for r in analysis["runs"]] == [40] * 6
  printed = capsys.readouterr().out
  assert "**merged models**" in printed and "| layershuffle (ViT L4 D32 P2) merged |" in printed
  assert cli.evaluate(["--mode", "bogus", "--workdir", str(root / "*")]) == 1
  assert "unknown mode 'bogus'" in capsys.readouterr().err
