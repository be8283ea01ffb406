"""Every method recipe in configs/ trains the tiny GPT a few steps: the loss goes down and the
logged sparsity is the method's (N:M density, DST's constant sparsity)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import STEPS, TINY

from sparsejax.run import configlib, experiment, rundir

ROOT = Path(__file__).resolve().parents[1]
MICRO = "1,32,2,64"  # one block, d_model 32: every contraction dim divides by 8


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(TINY)
    c.model.size = MICRO
    c.train.steps = STEPS
    c.eval.every = STEPS
    c.train.log_every = 1
    c.checkpoint.every = STEPS  # one save: orbax saves dominate a run this small
    return c


@pytest.mark.parametrize("name, final_sparsity", [
    ("sr_ste", 0.5), ("mdgf", 0.875), ("sdgf", 0.875), ("rigl", 0.75), ("set", 0.75),
])
@pytest.mark.slow
def test_recipe_lowers_the_loss(tmp_path, name, final_sparsity):
    c = recipe(name)
    if name in ("rigl", "set"):
        c.sparsity.update_every = 2  # a drop/grow at steps 2 and 4 of the 8
    summary = experiment.run(c, str(tmp_path / "run"), progress=False)
    records = rundir.read_metrics(tmp_path / "run")
    assert summary["status"] == "completed"
    # counts come from the masks for straight-through methods too (dense weights at init)
    assert 0 < summary["n_prunable"] < summary["n_params"]
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.2, name
    assert records[-1]["sparsity"] == pytest.approx(final_sparsity, abs=2e-3), name
    configlib.validate(c)
