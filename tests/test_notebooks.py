"""Execute notebooks/fit_scaling_law.ipynb (nbclient) so it never rots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fit_scaling_law_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # a "python3" kernel spec running this interpreter, found first on JUPYTER_PATH: the
    # kernel then has this environment's packages whatever PATH's "python" is
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.delenv("SPARSEJAX_SWEEP_DIR", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "notebooks" / "fit_scaling_law.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "ChinchillaFit" in text and "Bootstrap" in text and "predicted loss" in text
    # its example data is the repository's own (tests/data), never a folder beside the clone
    source = "".join(c.source for c in nb.cells)
    assert 'DATA = ROOT / "tests" / "data"' in source and "shared" not in source
    assert "val_loss_se" in text  # the sweep's table (sparsejax.results.sweep_frame)
    # section 3: the 2-budget sweep is flagged and the planner refuses it; fixing beta plans
    assert "DEGENERATE: beta is not identified: D has 2 distinct value(s)" in text
    assert "no plan: refusing to plan from a degenerate law" in text
    assert "s=0.50 with beta fixed" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images == 8
