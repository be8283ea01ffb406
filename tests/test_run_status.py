"""Run status tells the truth: divergence, damaged checkpoints, missing config.json, SIGINT,
the run-dir lock, ``sparsejax status``, cumulative wall time."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import STEPS, TINY, flat_tree, tiny_config

from sparsejax import cli
from sparsejax.run import checkpoint, experiment, rundir

ROOT = Path(__file__).resolve().parents[1]
def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _data_file(step_dir: Path) -> Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def damage(step_dir: Path, kind: str) -> None:
    if kind == "empty":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    elif kind == "no_METADATA":
        next(step_dir.rglob("_METADATA")).unlink()
    elif kind == "no_manifest":
        for p in step_dir.rglob("manifest.ocdbt"):
            p.unlink()
    elif kind == "truncated":
        f = _data_file(step_dir)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "bitflip":
        f = _data_file(step_dir)
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x04
        f.write_bytes(bytes(b))
    else:
        raise AssertionError(kind)




@pytest.mark.slow
@pytest.mark.parametrize("kind", ["empty", "no_METADATA", "no_manifest", "truncated", "bitflip"])
def test_restore_skips_damaged_latest_checkpoint(finished_run, tmp_path, kind):
    run_dir = copy_run(finished_run, tmp_path)
    damage(run_dir / "checkpoints" / "8", kind)
    like = checkpoint.load_raw(finished_run, step=6)
    with pytest.warns(UserWarning, match="skipped damaged checkpoint.*step 8"):
        state, step = checkpoint.restore_newest(run_dir, like, keep=4)
    assert step == 6
    for (ka, va), (kb, vb) in zip(flat_tree(like), flat_tree(state), strict=True):
        assert ka == kb
        np.testing.assert_array_equal(va, vb, err_msg=ka)
    assert (run_dir / "damaged_checkpoints" / "8").is_dir()
    assert checkpoint.latest_step(run_dir) == 6


@pytest.mark.slow
def test_no_checkpoint_restores_names_run_dir(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    for step in (2, 4, 6, 8):
        damage(run_dir / "checkpoints" / str(step), "no_METADATA")
    with pytest.raises(ValueError, match=f"run dir {run_dir}: no checkpoint restores"):
        checkpoint.restore_newest(run_dir, checkpoint.load_raw(finished_run), keep=4)
    assert not (run_dir / "damaged_checkpoints").exists()  # nothing moved when none restores


@pytest.mark.slow
def test_training_resumes_past_damaged_checkpoint(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    (run_dir / "summary.json").unlink()  # as if killed after the last checkpoint
    damage(run_dir / "checkpoints" / "8", "bitflip")
    with pytest.warns(UserWarning, match="step 8"):
        summary = experiment.run(tiny_config(), str(run_dir), progress=False)
    assert summary["status"] == "completed" and summary["resumed_from"] == 6
    a, b = (dict(flat_tree(checkpoint.load_raw(d))) for d in (finished_run, run_dir))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_resume_keeps_the_metrics_after_an_unreadable_line(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    (run_dir / "summary.json").unlink()  # as if killed after the last checkpoint
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"  # one damaged record, 3 after it
    metrics.write_text("".join(lines))
    with pytest.warns(UserWarning, match=f"{metrics}:2: unreadable"):
        summary = experiment.run(tiny_config(), str(run_dir), progress=False)
    assert summary["status"] == "completed" and summary["step"] == STEPS
    with pytest.warns(UserWarning, match=f"{metrics}:2"):
        assert [r["step"] for r in rundir.read_metrics(run_dir)] == [2, 6, 8]
    assert metrics.read_text().startswith("".join(lines))  # nothing rewritten


@pytest.mark.slow
def test_checkpoints_without_config_json_refused(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    (run_dir / "config.json").unlink()
    (run_dir / "summary.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        experiment.run(tiny_config(seed=1), str(run_dir), progress=False)
    assert not (run_dir / "config.json").exists()


@pytest.mark.slow
def test_rerun_of_completed_run_keeps_summary(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    (run_dir / "metrics.jsonl").unlink()
    before = (run_dir / "summary.json").read_bytes()
    summary = experiment.run(tiny_config(), str(run_dir), progress=False)
    assert summary["status"] == "completed"
    assert (run_dir / "summary.json").read_bytes() == before
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_divergence_stops_with_status_diverged(tmp_path, capsys):
    run_dir = tmp_path / "div"
    args = ["train", f"--config={ROOT / 'configs' / 'dense.py'}:{TINY}", f"--workdir={run_dir}",
            "--config.train.steps=40", "--config.train.lr=1e3", "--noprogress"]
    assert cli.main(args) == 1
    assert "diverged" in capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] < 40
    records = rundir.read_metrics(run_dir)
    assert records[-1]["step"] == summary["diverged_step"]  # stopped at the first bad log step
    assert all(np.isfinite(r["train_loss"]) for r in records[:-1])
    assert not np.isfinite(rundir.number(records[-1]["train_loss"]))
    assert isinstance(records[-1]["train_loss"], str)  # "nan"/"inf": valid JSON
    assert checkpoint.latest_step(run_dir) < summary["diverged_step"]
    assert cli.main(args) == 1  # a rerun reports the same, without crashing or retraining
    assert json.loads((run_dir / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_an_overflowing_update_is_a_divergence_not_a_composition_error(tmp_path, capsys):
    # lr=1e30: the weights overflow before the loss is logged, and a pruning step then finds
    # non-finite weights where its masks prune (once reported as "the optimizer does not keep
    # its masks exact")
    run_dir = tmp_path / "div"
    args = ["train", f"--config={ROOT / 'configs' / 'gradual_magnitude.py'}:{TINY}",
            f"--workdir={run_dir}", "--config.train.steps=8", "--config.eval.every=8",
            "--config.train.log_every=4", "--config.sparsity.update_every=1",
            "--config.sparsity.begin_step=0", "--config.sparsity.end_step=6",
            "--config.train.lr=1e30", "--noprogress"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("sparsejax: run diverged:") and "masks" not in err, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] == 4


@pytest.mark.slow
def test_stale_lock_taken_over_and_status_reads_interrupted(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "lock").write_text(f"{dead.pid}\n")
    summary = rundir.read_json(run_dir / "summary.json")
    rundir.write_json(run_dir / "summary.json", {**summary, "status": "running"})
    assert rundir.lock_owner(run_dir) is None
    assert cli.main(["status", str(run_dir)]) == 0
    line = capsys.readouterr().out.splitlines()[1].split()
    assert line[:3] == ["run", "interrupted", "8"]
    with rundir.RunLock(run_dir):  # the dead process's lock is taken over
        assert rundir.lock_owner(run_dir) == os.getpid()
        with pytest.raises(rundir.RunDirBusyError, match=str(os.getpid())):
            rundir.RunLock(run_dir).__enter__()
    assert not (run_dir / "lock").exists()


@pytest.mark.slow
def test_status_of_a_sweep_lists_every_run_aligned_with_its_checkpoint_and_eta(
        finished_run, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    long = "a-run-name-longer-than-the-old-column_" * 2  # 76 characters
    shutil.copytree(finished_run, sweep / long)  # completed
    part = sweep / "partial"  # killed at step 8 with checkpoints up to 4
    shutil.copytree(finished_run, part)
    for step in (6, 8):
        shutil.rmtree(part / "checkpoints" / str(step))
    summary = rundir.read_json(part / "summary.json")
    rundir.write_json(part / "summary.json", {**summary, "status": "running"})
    live = sweep / "live"  # running in this process, 4 of 8 steps logged
    shutil.copytree(finished_run, live)
    lines = (live / "metrics.jsonl").read_text().splitlines(keepends=True)
    (live / "metrics.jsonl").write_text("".join(lines[:2]))
    rundir.write_json(live / "summary.json", {"status": "running", "step": 0, "steps": STEPS})
    rundir.write_json(sweep / "sweep.json", {"recipe": "r.py", "runs": [
        {"name": "later", "status": "pending"}, {"name": long, "status": "completed"},
        {"name": "bad", "status": "failed", "reason": "InputError: no such corpus"},
        {"name": "partial", "status": "running"}, {"name": "live", "status": "running"}]})
    with rundir.RunLock(live):
        assert cli.main(["status", str(sweep)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[1:]}
    assert list(rows) == ["later", long, "bad", "partial", "live"]  # sweep.json's order
    assert rows["later"][:4] == ["pending", "-", "-", "n/a"]
    assert rows["bad"][0] == "failed" and out[3].endswith("InputError: no such corpus")
    assert rows[long][:3] == ["completed", "8", "8"]
    loss_8 = rundir.read_metrics(part)[-1]["val_loss"]
    assert rows["partial"][:4] == ["interrupted", "8", "4", f"{loss_8:.4f}"]  # resumes from 4
    assert rows["live"][:3] == ["running", "4", "8"] and rows["live"][5] != "-"  # an ETA
    assert rows[long][5] == rows["partial"][5] == "-"
    spans = [[m.span() for m in re.finditer(r"\S+", line)] for line in out]
    assert {row[1][0] for row in spans} == {spans[0][1][0]}  # status: left-aligned
    for col in (2, 3, 4, 5):  # step, ckpt, loss, wall_s: right-aligned under their headers
        assert {row[col][1] for row in spans} == {spans[0][col][1]}, out[0].split()[col]


def _cli_args(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "sparsejax", "train",
            f"--config={ROOT / 'configs' / 'dense.py'}:{TINY}", f"--workdir={run_dir}",
            "--config.train.steps=120", "--config.checkpoint.every=10",
            "--config.train.log_every=10", "--config.eval.every=120", "--noprogress"]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_sigint_interrupts_lock_refuses_second_and_same_command_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli_args(run_dir), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "10").is_dir():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)  # hold it mid-run while a second trainer tries
    try:  # a second trainer on the same run dir refuses, naming the first one's PID
        assert cli.main(_cli_args(run_dir)[3:]) == 2
    finally:
        proc.send_signal(signal.SIGCONT)
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsejax: error:") and str(proc.pid) in err and "\n" not in err
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "run the same command to resume" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["step"] == checkpoint.latest_step(run_dir) >= 10
    assert not (run_dir / "lock").exists()
    assert cli.main(_cli_args(run_dir)[3:]) == 0  # the same command, in this process
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["status"] == "completed" and done["resumed_from"] == summary["step"]
    assert done["wall_time_s"] > summary["wall_time_s"]  # cumulative over both sessions
