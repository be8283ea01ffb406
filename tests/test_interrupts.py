"""Runs that stop before they finish can always continue, and say why they stopped: a kill
before the first checkpoint, SIGTERM (a cluster's preemption), a second signal, a checkpoint
that cannot be saved. The subprocess tests send real signals to a real ``sparsejax train``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import STEPS, TINY, flat_tree, tiny_config

from sparsejax import cli, errors
from sparsejax.run import checkpoint, experiment, rundir
from sparsejax.run.rundir import RunDir
from sparsejax.run.signals import DeferredInterrupt

ROOT = Path(__file__).resolve().parents[1]
LONG = 60  # steps of the subprocess runs: one checkpoint, at the end




def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise the same final checkpoint, final losses and metrics records."""
    ca, cb = dict(flat_tree(checkpoint.load_raw(a))), dict(flat_tree(checkpoint.load_raw(b)))
    assert ca.keys() == cb.keys()
    for key in ca:
        np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)
    sa, sb = (rundir.read_json(RunDir(d).summary_file) for d in (a, b))
    for key in ("final_val_loss", "val_loss_se", "train_loss", "n_avg", "flops", "step"):
        assert sa[key] == sb[key], key
    drop = rundir.TIMING_FIELDS  # step_time_s, wall_time_s, mfu: the clock, not the run
    ra, rb = ([{k: v for k, v in r.items() if k not in drop} for r in rundir.read_metrics(d)]
              for d in (a, b))
    assert ra == rb


def _cli(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "sparsejax", "train",
            f"--config={ROOT / 'configs' / 'dense.py'}:{TINY}", f"--workdir={run_dir}",
            f"--config.train.steps={LONG}", f"--config.checkpoint.every={LONG}",
            f"--config.eval.every={LONG}", "--noprogress"]


def _start(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(_cli(run_dir), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _when_logged(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Wait until the run logged ``step`` (it trains: past setup and compilation)."""
    deadline = time.time() + 300
    while RunDir(run_dir).last_logged_step() < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run of the subprocess tests' config."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(_cli(run_dir)[3:]) == 0
    return run_dir


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_then_the_same_command_completes(
        reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _when_logged(proc, run_dir, 2)
    proc.kill()
    proc.communicate()
    assert RunDir(run_dir).checkpoint_steps() == []  # killed before its first checkpoint
    assert RunDir(run_dir).status().status == "interrupted"
    assert cli.main(_cli(run_dir)[3:]) == 0  # once: "no checkpoint restores ()", every time
    summary = rundir.read_json(RunDir(run_dir).summary_file)
    assert summary["status"] == "completed" and summary["resumed_from"] == 0
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == list(range(2, LONG + 1, 2))
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_the_resumed_run_is_bitwise_the_same(
        reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _when_logged(proc, run_dir, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == errors.EXIT_TERMINATED, err
    assert "Traceback" not in err and "run the same command to resume" in err
    summary = rundir.read_json(RunDir(run_dir).summary_file)
    saved = RunDir(run_dir).checkpoint_steps()
    assert summary["status"] == "interrupted" and saved == [summary["step"]]
    assert 2 <= summary["step"] < LONG  # the step boundary after the signal, not step 40
    assert not RunDir(run_dir).lock_file.exists()
    assert cli.main(_cli(run_dir)[3:]) == 0
    done = rundir.read_json(RunDir(run_dir).summary_file)
    assert done["status"] == "completed" and done["resumed_from"] == summary["step"]
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_half_written_checkpoints_are_removed_and_the_run_starts_over(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints" / "2.orbax-checkpoint-tmp").mkdir(parents=True)  # a kill mid-save
    rundir.write_json(run_dir / "summary.json", {"status": "running", "step": 0})
    with pytest.warns(UserWarning, match="half-written: 2.orbax-checkpoint-tmp"):
        summary = experiment.run(tiny_config(), str(run_dir), progress=False)
    assert summary["status"] == "completed" and summary["resumed_from"] == 0
    assert RunDir(run_dir).checkpoint_steps() == [2, 4, 6, 8]
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == [2, 4, 6, STEPS]
    assert_same_run(run_dir, finished_run)


@pytest.mark.slow
def test_a_failed_save_ends_failed_with_a_reason_and_the_process_can_exit(tmp_path):
    run = RunDir(tmp_path / "run").create()
    run.checkpoints.write_text("")  # no folder can be made there
    with pytest.raises(errors.SaveFailed, match=f"saving a checkpoint in {run.checkpoints} "
                       r"failed \(NotADirectoryError"):
        experiment.run(tiny_config(), str(run), progress=False)
    summary = run.read_summary()
    assert summary["status"] == "failed" and "\n" not in summary["error"]
    assert summary["error"].startswith("SaveFailed: saving a checkpoint")
    assert not run.lock_file.exists()
    # no thread of the failed save is left waiting (once: orbax's 300 s timeout, at exit)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            # the base join: orbax's own raises CancelledError for the threads the failed
            # save cancelled on purpose (sparsejax.run.saving), even once they have ended
            threading.Thread.join(thread, timeout=10)
            assert not thread.is_alive(), thread


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.5)  # the handler runs at the next bytecode; never this long


def test_the_first_signal_waits_for_the_step_boundary_a_second_stops_at_once():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with DeferredInterrupt() as interrupt:  # setting up: nothing in flight, stop at once
        with pytest.raises(errors.Interrupted) as stop:
            _signal_self(signal.SIGTERM)
        assert stop.value.exit_code == 143 and not stop.value.at_once
    with DeferredInterrupt() as interrupt:
        interrupt.defer()  # the loop runs
        _signal_self(signal.SIGTERM)  # deferred to the step boundary
        assert interrupt.pending
        with pytest.raises(errors.Interrupted) as stop:
            interrupt.check()
        assert stop.value.signum == signal.SIGTERM
        with pytest.raises(errors.Interrupted) as stop:
            _signal_self(signal.SIGINT)  # a second signal: at once
        assert stop.value.at_once and stop.value.exit_code == 130
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # a third ends the process
    assert {s: signal.getsignal(s) for s in before} == before
    assert isinstance(stop.value, KeyboardInterrupt)  # every Ctrl-C path handles it
