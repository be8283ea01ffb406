"""CLI errors a user can read: one ``sparsejax: error:`` line naming the key or path and the
valid range, exit status 2, no traceback (``--debug`` shows it); ``--help`` everywhere. The exit
status comes from the error's type (sparsejax.errors), never from its message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, one_error_line

from sparsejax import cli, errors
from sparsejax.run.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
DENSE = f"--config={ROOT / 'configs' / 'dense.py'}:{TINY}"


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


@pytest.mark.slow
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


@pytest.mark.parametrize("raised, code, line", [
    (errors.RunDiverged("loss nan at step 12;\nsee summary"), 1,
     "sparsejax: run diverged: loss nan at step 12; see summary"),
    (errors.ExactnessError("step 4: 3 pruned weights are not 0"), 1,
     "sparsejax: run failed: step 4: 3 pruned weights are not 0"),
    (errors.ConfigError("config train.lr must be > 0, got 0.0"), 2,
     "sparsejax: error: config train.lr must be > 0, got 0.0"),
    (errors.MissingInputError("run dir r does not exist"), 2,
     "sparsejax: error: run dir r does not exist"),
    (errors.RunDirBusyError("run dir r is in use by process 7"), 2,
     "sparsejax: error: run dir r is in use by process 7"),
    (ZeroDivisionError("division by zero"), 1, "sparsejax: internal error: ZeroDivisionError: "
     "division by zero (run with --debug for the traceback)"),
    (KeyError("params"), 1, "sparsejax: internal error: KeyError: 'params' (run with --debug "
     "for the traceback)"),
    (KeyboardInterrupt(), 130, "sparsejax: interrupted"),
])
def test_exit_status_comes_from_the_error_type(capsys, monkeypatch, raised, code, line):
    def status_main(argv):
        raise raised

    monkeypatch.setattr(cli, "status_main", status_main)
    assert cli.main(["status", "some/run"]) == code
    out = capsys.readouterr()
    assert out.err.strip() == line and out.out == ""
    with pytest.raises(type(raised)):  # --debug: the exception itself, with its traceback
        cli.main(["--debug", "status", "some/run"])


def test_a_bad_run_dir_is_exit_status_2(capsys, tmp_path):
    run = RunDir(tmp_path / "run").create()
    run.summary_file.write_text('{"status": "runn')  # torn by hand: JSON files are atomic
    assert f"{run.summary_file} is not valid JSON" in one_error_line(capsys, ["status", str(run)])
    assert "does not exist" in one_error_line(capsys, ["oneshot", str(tmp_path / "missing")])
    assert "--sparsities" in one_error_line(capsys, ["oneshot", str(run), "--sparsities", "x"])


def test_an_argument_error_comes_before_the_heavy_imports(tmp_path):
    # a fresh process: the recipe loader (flax, the models) and ml_collections' flag parsing
    # are not imported to refuse an unknown key (measured: 1.2-1.5 s at load 3 on 2 cores,
    # the floor being `import jax` through the sparsejax package)
    code = ("import sys; from sparsejax import cli; "
            f"rc = cli.main(['train', '--config', {str(ROOT / 'configs' / 'dense.py')!r}, "
            f"'--workdir', {str(tmp_path / 'r')!r}, '--config.nope=1']); "
            "print(rc, *(m in sys.modules for m in ('flax', 'ml_collections.config_flags', "
            "'sparsejax.sweep.plan')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.split() == ["2", "False", "False", "False"], out.stderr
    assert "unknown config key 'nope'" in out.stderr
