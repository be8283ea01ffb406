"""Sweeps: a recipe's sweep(add) becomes one run dir per run plus sweep.json; relaunch skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import scaling.logs
from sparsejax import cli, sweep

RECIPE = '''
from sparsejax import configlib

def get_config(arg=None):
    c = configlib.base()
    c.model.n_ctx = 32
    c.train.seq_len = 32
    c.train.batch_size = 4
    c.train.steps = 4
    c.train.warmup_steps = 1
    c.train.log_every = 2
    c.eval.every = 4
    c.eval.batches = 1
    c.eval.batch_size = 4
    c.checkpoint.every = 4
    return configlib.apply_arg(c, arg)

def sweep(add):
    add(**{"sparsity.method": "dense"})
    add(**{"sparsity.method": "static", "sparsity.final": 0.5, "train.steps": 6})
'''


@pytest.mark.slow
def test_sweep_runs_and_skips(tmp_path: Path, capsys):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE)
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--config", f"{recipe}:size=tiny", "--workdir", str(out),
                     "--noprogress", "--config.train.warmup_steps=2"]) == 0
    meta = json.loads((out / "sweep.json").read_text())
    names = [r["name"] for r in meta["runs"]]
    assert names == ["method-dense", "final-0.5_method-static_steps-6"]
    for name, steps in zip(names, (4, 6), strict=True):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["step"] == steps
        config = json.loads((out / name / "config.json").read_text())
        assert config["train"]["warmup_steps"] == 2  # the command line's override, every run
    sparse = json.loads((out / names[1] / "summary.json").read_text())
    assert 0.49 < sparse["sparsity"] < 0.51 and sparse["n_avg"] < sparse["n_params"]
    # the scaling side reads the sweep dir the trainer wrote (N = n_avg, D = tokens)
    table = scaling.logs.load_table(out, min_points=2)
    dense = json.loads((out / names[0] / "summary.json").read_text())
    assert sorted(table.N.tolist()) == sorted([sparse["n_avg"], dense["n_avg"]])
    assert sorted(table.D.tolist()) == [4 * 4 * 32, 6 * 4 * 32]
    assert sorted(table.loss.tolist()) == sorted([sparse["val_loss"], dense["val_loss"]])
    capsys.readouterr()
    assert cli.main(["status", str(out)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        [(names[0], "completed", "4"), (names[1], "completed", "6")])
    assert cli.main(["sweep", "--config", f"{recipe}:size=tiny", "--workdir", str(out),
                     "--config.train.warmup_steps=2"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_sweep_errors(tmp_path: Path):
    recipe = tmp_path / "bad.py"
    recipe.write_text(RECIPE.replace('"sparsity.final": 0.5', '"sparsity.finall": 0.5'))
    with pytest.raises(ValueError, match="unknown config key"):
        sweep.configs(str(recipe))
    with pytest.raises(ValueError, match="does not exist"):
        sweep.configs(str(tmp_path / "missing.py"))
    assert sweep.run_name({"model.size": "XS", "sparsity.final": 0.5}) == "size-XS_final-0.5"


def test_sweep_overrides_use_the_config_syntax(tmp_path: Path, capsys):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE)
    argv = ["sweep", "--config", str(recipe), "--workdir", str(tmp_path / "s"), "--dry-run"]
    assert cli.main([*argv, "--config.train.steps=5"]) == 0
    assert "method-dense: planned" in capsys.readouterr().out
    assert not (tmp_path / "s").exists()
    for bad, key in (("--config.train.stepz=5", "train.stepz"), ("--set", "--set"),
                     ("--config.train.lr=-1.0", "train.lr")):
        assert cli.main([*argv, bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sparsejax: error:") and key in err and "\n" not in err
    # the command line's value applies to every run, after the run's own overrides
    runs = sweep.configs(str(recipe), {"train.steps": 9})
    assert [c.train.steps for _, _, c in runs] == [9, 9]
