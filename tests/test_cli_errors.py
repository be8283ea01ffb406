"""CLI errors a user can read: one ``sparsejax: error:`` line naming the key or path and the
valid range, exit status 2, no traceback (``--debug`` shows it); ``--help`` everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY

from sparsejax import cli

ROOT = Path(__file__).resolve().parents[1]
DENSE = f"--config={ROOT / 'configs' / 'dense.py'}:{TINY}"


def one_error_line(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("sparsejax: error: ") and "Traceback" not in out.err + out.out
    return lines[0]


@pytest.mark.parametrize("override, expected", [
    ("--config.train.stepz=5", ["'train.stepz'", "'train.steps'"]),
    ("--config.train.steps=abc", ["train.steps", "abc"]),
    ("--config.train.steps=0", ["train.steps", ">= 1"]),
    ("--config.train.steps=99999999999", ["train.steps", "2147483647"]),
    ("--config.train.lr=inf", ["train.lr", "finite"]),
    ("--config.train.lr=nan", ["train.lr", "finite"]),
    ("--config.train.lr=0.0", ["train.lr", "> 0"]),
    ("--config.train.b1=1.0", ["train.b1", "[0, 1)"]),
    ("--config.train.b2=-0.1", ["train.b2", "[0, 1)"]),
    ("--config.sparsity.allocation=nope", ["sparsity.allocation", "one of"]),
    ("--bogus", ["'--bogus'", "--config.KEY=VALUE"]),
])
def test_train_bad_override(capsys, tmp_path, override, expected):
    line = one_error_line(capsys, ["train", DENSE, f"--workdir={tmp_path / 'r'}", override])
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "r").exists()  # nothing was written


@pytest.mark.parametrize("config, expected", [
    (f"{ROOT / 'configs' / 'dense.py'}:size=tinyy", ["model.size", "tinyy", "'XS'"]),
    (f"{ROOT / 'configs' / 'dense.py'}:sparsity=0.5", ["'sparsity'"]),  # alias dropped
    (f"{ROOT / 'configs' / 'nope.py'}", ["nope.py", "does not exist"]),
])
def test_train_bad_config_arg(capsys, tmp_path, config, expected):
    line = one_error_line(capsys, ["train", f"--config={config}", f"--workdir={tmp_path}"])
    for text in expected:
        assert text in line, line


def test_window_solve_that_would_not_fit_in_memory(capsys, tmp_path):
    gm = f"--config={ROOT / 'configs' / 'gradual_magnitude.py'}:{TINY}"
    line = one_error_line(capsys, ["train", gm, f"--workdir={tmp_path}",
                                   "--config.train.steps=2000000000"])
    assert "train.steps" in line and "bytes per step" in line


def test_missing_arguments_and_commands(capsys, tmp_path):
    assert "--workdir" in one_error_line(capsys, ["train", DENSE])
    assert "'bogus'" in one_error_line(capsys, ["bogus"])
    assert "does not exist" in one_error_line(capsys, ["export", "--format", "bsr",
                                                       str(tmp_path / "missing")])
    assert "no checkpoint" in one_error_line(capsys, ["export", "--format", "bsr", str(tmp_path)])
    assert "is not a directory" in one_error_line(capsys, ["status", str(tmp_path / "missing")])
    assert "holds no run" in one_error_line(capsys, ["status", str(tmp_path)])
    (tmp_path / "file").write_text("")
    assert str(tmp_path / "file") in one_error_line(capsys, ["train", DENSE,
                                                             f"--workdir={tmp_path / 'file'}"])


def test_export_nm_on_unstructured_weights(capsys, finished_run, tmp_path):
    line = one_error_line(capsys, ["export", "--format", "nm", str(finished_run),
                                   "--out", str(tmp_path / "x")])
    assert "N:M" in line or "2:4" in line, line


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="train.stepz"):
        cli.main(["--debug", "train", DENSE, f"--workdir={tmp_path}", "--config.train.stepz=5"])


@pytest.mark.parametrize("command", ["train", "sweep", "status", "export", "fit", "soup"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "usage: sparsejax" in capsys.readouterr().out
