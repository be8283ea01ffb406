"""Sweep backends: the executor plumbing on a fake executor (always runs), flag checks, the
local backend never importing ray, and a local Ray sweep killed mid-way and resumed (skipped
only when ray is not importable: it is the optional extra ``sparsejax[ray]``)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

from sparsejax import cli, sweep
from sparsejax.run import configlib, rundir
from sparsejax.run.rundir import RunDir, WorkerRecord
from sparsejax.sweep import launcher

ROOT = Path(__file__).resolve().parents[1]
RECIPE = '''
from sparsejax.run import configlib

def get_config(arg=None):
    c = configlib.apply_arg(configlib.base(), TINY_ARG)  # tests/conftest.py's
    c.train.steps = 6
    c.eval.every = 6
    return configlib.apply_arg(c, arg)

def sweep(add):
    add(seed=0, **LONG)
    for seed in (1, 2, 3):
        add(seed=seed)
'''
RECIPE = RECIPE.replace("TINY_ARG", repr(TINY))
# seed 0 is long (checkpoints every 50 steps): the Ray sweep is stopped while it trains
LONG = {"train.steps": 300, "train.log_every": 50, "eval.every": 300, "checkpoint.every": 50}
RECIPE = RECIPE.replace("**LONG", f"**{LONG!r}")
SEED0 = sweep.run_name({"seed": 0, **LONG})


class FakeHandle:
    """A run that 'finishes' on its ``polls``-th poll, writing what a worker would:
    ``outcome`` "completed", "failed" (its record names the error), "killed" (SIGKILL: no
    record) or "silent" (exit status 1 and no record)."""

    def __init__(self, run: sweep.Run, run_dir: Path, outcome: str, polls: int):
        self.run, self.run_dir, self.outcome, self.polls = run, run_dir, outcome, polls
        self.returncode: int | None = None
        self.signals: list[int] = []

    def _finish(self, status: str, code: int, record: bool = True) -> None:
        summary = {"status": status, "steps": self.run.spec.train.steps,
                   "final_val_loss": 1.0 + self.run.spec.seed, "val_loss_se": 0.1}
        run = RunDir(self.run_dir)
        run.write_summary(summary)
        if record:
            error = ("RunFailed", f"fake {status}") if code not in (0, 130) else (None, None)
            run.write_worker(WorkerRecord(code, 0.1, 0.1, [0], 1, *error))
        self.returncode = code

    def poll(self) -> int | None:
        self.polls -= 1
        if self.returncode is None and self.polls <= 0:
            if self.outcome == "completed":
                self._finish("completed", 0)
            elif self.outcome == "failed":
                self._finish("failed", 1)
            elif self.outcome == "killed":
                self._finish("running", -signal.SIGKILL, record=False)
            else:
                self._finish("running", 1, record=False)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self._finish("interrupted", 130)

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def kill(self) -> None:
        raise AssertionError("a fake run stops on SIGINT")


class FakeExecutor:
    def __init__(self, slots: int, fail: str = "", interrupt_at: int = -1,
                 outcomes: dict[str, str] | None = None):
        self.slots, self.interrupt_at = slots, interrupt_at
        self.outcomes = {fail: "failed", **(outcomes or {})}
        self.started: list[str] = []
        self.checked: list[str] = []
        self.handles: list[FakeHandle] = []
        self.closed = False

    def check(self, runs):
        self.checked = [r.name for r in runs]

    def start(self, run, run_dir, slot):
        assert 0 <= slot < self.slots
        if len(self.started) == self.interrupt_at:
            raise KeyboardInterrupt
        self.started.append(run.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        h = FakeHandle(run, run_dir, self.outcomes.get(run.name, "completed"), 3)
        self.handles.append(h)
        return h

    def close(self):
        self.closed = True


@pytest.fixture()
def recipe(tmp_path: Path) -> str:
    path = tmp_path / "recipe.py"
    path.write_text(RECIPE)
    return f"{path}:size=tiny"


def _runs(out: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((out / "sweep.json").read_text())["runs"]}


def test_executor_runs_records_and_resumes(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "POLL_S", 0.0)
    out = tmp_path / "sweep"
    ex = FakeExecutor(slots=2, fail="seed-2")
    entries = sweep.launch(recipe, out, executor=ex, progress=False, stream=open(os.devnull, "w"))
    names = sorted([SEED0, "seed-1", "seed-2", "seed-3"])
    assert sorted(ex.started) == names and ex.closed
    assert ex.started[0] == SEED0  # the longest run goes first
    assert sorted(ex.checked) == names
    runs = _runs(out)
    assert {n: runs[n]["status"] for n in names} == {
        SEED0: "completed", "seed-1": "completed", "seed-2": "failed", "seed-3": "completed"}
    assert runs["seed-2"]["reason"] == "RunFailed: fake failed"  # from its worker.json
    assert runs["seed-3"]["final_val_loss"] == 4.0
    assert [e["status"] for e in entries] == [runs[n]["status"] for n in names]
    # relaunch: the finished runs are skipped, only the failed one starts again
    ex2 = FakeExecutor(slots=2)
    sweep.launch(recipe, out, executor=ex2, progress=False, stream=open(os.devnull, "w"))
    assert ex2.started == ["seed-2"]
    assert _runs(out)["seed-2"]["status"] == "completed"
    assert "reason" not in _runs(out)["seed-2"]


def test_failure_reasons_come_from_the_worker_record(recipe, tmp_path, monkeypatch):
    """The reason in sweep.json is what this launch's worker recorded in its worker.json; a
    worker that left none (killed by a signal, or dead before writing it) is named by its
    signal or exit status, never by a record an earlier launch left behind."""
    monkeypatch.setattr(launcher, "POLL_S", 0.0)
    out = tmp_path / "sweep"
    for name in ("seed-1", "seed-2"):  # records of an earlier launch
        RunDir(out / name).create().write_worker(WorkerRecord(1, error_type="ConfigError",
                                                              error="stale"))
    ex = FakeExecutor(slots=4, outcomes={"seed-1": "killed", "seed-2": "silent",
                                         "seed-3": "failed"})
    sweep.launch(recipe, out, executor=ex, progress=False, stream=open(os.devnull, "w"))
    runs = _runs(out)
    assert {n: runs[n]["status"] for n in ("seed-1", "seed-2", "seed-3")} == dict.fromkeys(
        ("seed-1", "seed-2", "seed-3"), "failed")
    assert runs["seed-1"]["reason"] == "killed by signal SIGKILL"
    assert runs["seed-2"]["reason"] == (f"exit status 1; the worker left no record (see "
                                        f"{RunDir(out / 'seed-2').worker_log})")
    assert runs["seed-3"]["reason"] == "RunFailed: fake failed"
    assert "reason" not in runs[SEED0] and runs[SEED0]["process_wall_s"] == 0.1


def test_executor_interrupt_signals_running_runs(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "POLL_S", 0.0)
    out = tmp_path / "sweep"
    ex = FakeExecutor(slots=2, interrupt_at=1)  # Ctrl-C while starting the second run
    with pytest.raises(KeyboardInterrupt):
        sweep.launch(recipe, out, executor=ex, progress=False, stream=open(os.devnull, "w"))
    assert ex.handles[0].signals == [signal.SIGINT] and ex.closed
    runs = _runs(out)
    assert runs[SEED0]["status"] == "interrupted"
    assert {runs[n]["status"] for n in ("seed-1", "seed-2", "seed-3")} == {"pending"}


def test_backend_flags_checked(recipe, tmp_path, capsys):
    with pytest.raises(ValueError, match="--parallel is for --backend local"):
        sweep.check_backend("ray", 2, None)
    with pytest.raises(ValueError, match="--address is for --backend ray"):
        sweep.check_backend("local", None, "10.0.0.1:6379")
    with pytest.raises(ValueError, match="--backend must be one of"):
        sweep.check_backend("slurm", None, None)
    with pytest.raises(ValueError, match="--parallel must be an int >= 1"):
        sweep.check_backend("local", 0, None)
    code = cli.main(["sweep", "--config", recipe, "--workdir", str(tmp_path / "s"),
                     "--backend", "ray", "--parallel", "2", "--noprogress"])
    if importlib.util.find_spec("ray") is None:
        assert "--backend ray needs Ray: pip install 'sparsejax[ray]'" in capsys.readouterr().err
    else:
        assert "--parallel is for --backend local" in capsys.readouterr().err
    assert code == 2
    assert not (tmp_path / "s").exists()  # refused before anything was written
    for key, value in (("resources.cpus", 0.0), ("resources.gpus", -1.0)):
        c = configlib.base()
        configlib.set_key(c, key, value)
        with pytest.raises(ValueError, match=f"config.{key} must be a finite float"):
            configlib.validate(c)


@pytest.mark.slow
def test_local_backend_never_imports_ray(recipe, tmp_path):
    code = f"""
import sys
from sparsejax import cli, sweep
sweep.make_executor("local", parallel=2)
assert cli.main(["sweep", "--config", {recipe!r}, "--workdir", {str(tmp_path / 's')!r},
                 "--dry-run"]) == 0
assert "ray" not in sys.modules, "the local backend imported ray"
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_ray_sweep_killed_midway_resumes(recipe, tmp_path):
    """4 tiny runs on a local Ray instance: Ctrl-C once the long run has a checkpoint, then
    the same command finishes the sweep, the long run resuming from its checkpoint."""
    pytest.importorskip("ray")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sparsejax", "sweep", "--config", recipe, "--workdir",
           str(out), "--backend", "ray", "--noprogress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 300
    while not glob.glob(str(out / SEED0 / "checkpoints" / "50")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == cli.EXIT_INTERRUPTED, log[-3000:]
    runs = _runs(out)
    assert runs[SEED0]["status"] == "interrupted", runs
    first = {n: e["status"] for n, e in runs.items()}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = _runs(out)
    assert {n: e["status"] for n, e in runs.items()} == dict.fromkeys(first, "completed")
    summary = rundir.read_json(out / SEED0 / "summary.json")
    assert summary["resumed_from"] >= 50 and summary["step"] == 300
    steps = [r["step"] for r in rundir.read_metrics(out / SEED0)]
    assert steps == list(range(50, 301, 50))  # one record per logged step, none twice
