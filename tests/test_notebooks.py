"""The notebooks run top to bottom (small-size switch: CPU, no internet), so they cannot rot."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "digits"])
def test_notebook_runs(name, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  from nbclient import NotebookClient
  monkeypatch.setenv("LSVIT_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("LSVIT_NOTEBOOK_OUT", str(tmp_path / "out"))
  nb = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  pngs = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []))
  assert pngs >= 2, "the notebook shows its plots"
  if name == "quickstart":
    assert "same top-1 prediction as the original order" in text and "compilations: 1)" in text
    assert (tmp_path / "out" / "layershuffle" / "summary.json").exists()
    assert (tmp_path / "out" / "eval" / "prune.png").exists()
  else:
    assert "position readable from the UMAP picture" in text
    assert (tmp_path / "out" / "layershuffle" / "pretrain" / "summary.json").exists()
    assert (tmp_path / "out" / "eval" / "analysis_umap.png").exists()
