"""The reproduction command end to end on its tiny preset (real digits, 4 layers)."""
import json

import pytest

from lsvit import order as order_lib
from tools import reproduce


def test_plan_covers_the_papers_grid():
  p = reproduce.PRESETS["digits"]
  jobs = {j.name: j for j in reproduce.plan(p, "/x")}
  assert jobs["pretrain"].needs_pretrain is False
  for v in order_lib.VARIANTS:  # 5 seeds per approach
    assert all(f"{v}_seed{s}" in jobs for s in range(5))
  for v in ("baseline", "layershuffle"):  # >= L runs each for merging
    assert sum(n.startswith(f"{v}_seed") for n in jobs) == p.depth
  for k in (3, 6, 9):
    assert f"baseline_keep{k}_seed0" in jobs and "--config.keep_layers=%d" % k in jobs[f"baseline_keep{k}_seed0"].args
  assert "--config.init_from=/x/pretrain" in jobs["layerdrop_seed0"].args
  assert "--config.variant=layerdrop" in jobs["layerdrop_seed0"].args


def test_failed_run_stops_with_its_log(tmp_path, capsys):
  bad = reproduce.Job("broken", ["--config.variant=bogus", "--config.num_epochs=1",
                                 "--config.pretrain_epochs=0", "--config.progress=False"], 1, False)
  with pytest.raises(reproduce.RunFailed, match=r"(?s)run broken failed \(exit 1\).*unknown variant 'bogus'"):
    reproduce.train_all([bad], str(tmp_path), "configs/digits.py", 1, progress=False)
  assert not (tmp_path / "broken" / "summary.json").exists()


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path):
  out = tmp_path / "grid"
  assert reproduce.main(["--preset", "tiny", "--out", str(out), "--no_progress"]) == 0
  text = (out / "RESULTS.md").read_text()
  for section in ("## Which of the paper's claims", "## Table 1", "## Fig. 1b/1c", "## Table 2",
                  "## Position prediction", "## Fig. 4", "62.77 ± 0.41"):
    assert section in text
  figs = out / "docs" / "results" / "tiny"
  for f in ("prune_prune.png", "analysis_analysis_umap.png", "analysis_analysis_contributions.png",
            "table1_arbitrary.json", "merge_layershuffle_merge.json", "ensemble_layershuffle_ensemble.json"):
    assert (figs / f).exists(), f
  assert "docs/results/tiny/prune_prune.png" in text
  tables = (out / "eval" / "table1" / "tables.md").read_text()  # both modes, one evaluation
  assert "**sequential order**" in tables and "**arbitrary order**" in tables
  merged = json.load(open(figs / "merge_layershuffle_merge.json"))
  assert len(merged["models"]) == 100 and merged["runs"] == 4
  # every rule row says yes or no, computed from the numbers
  rows = [l for l in text.splitlines() if l.startswith("| ")
          and l.endswith(("| yes |", "| **no** |", "| *within noise* |"))]
  assert len(rows) >= 15 and all("p = " in r or "too few" in r for r in rows)
  # re-running skips every finished run
  jobs = reproduce.plan(reproduce.PRESETS["tiny"], str(out))
  assert all(reproduce.done(str(out), j) for j in jobs)
  assert reproduce.train_all(jobs, str(out), "configs/digits.py", 2, progress=False) == {}
  # the report regenerates from the stored JSON alone, identically
  (out / "RESULTS.md").unlink()
  assert reproduce.main(["--preset", "tiny", "--out", str(out), "--report_only"]) == 0
  assert (out / "RESULTS.md").read_text() == text
