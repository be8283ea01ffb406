"""Sweeps: every run a recipe's ``sweep(add)`` lists, one run dir and one process each.

big_vision style: a recipe file defines ``get_config(arg)`` and ``sweep(add)``; ``add(**kw)``
records one run as dotted-key overrides (``add(**{"model.size": "XS", "train.steps": 600})``).
Each run trains in ``SWEEP_DIR/<name>`` in its own process (:mod:`sparsejax.sweep.worker`), so
a crash loses nothing else; ``parallel`` runs go at once, each pinned to its share of the
cores (:func:`core_slots`, :func:`worker_env`), the longest first.

Resuming (:func:`plan`): a run whose ``config.json`` matches its resolved config is skipped
when completed (or diverged: rerunning would diverge again) and resumed from its latest
checkpoint otherwise; a run whose ``config.json`` differs is an error naming the run and the
keys, before anything runs. ``SWEEP_DIR/sweep.json`` keeps one entry per run ever planned
there (overrides, status, final loss and its SE, wall time, the failure reason; the last
worker process's wall and CPU seconds, ``process_wall_s`` and ``cpu_s``), merged on
every launch and rewritten atomically after every change; the parent process is its only
writer (it holds ``SWEEP_DIR/lock``). The sweep dir is what ``sparsejax fit`` and
``scaling.logs`` read.

Backends (:class:`Executor`): ``"local"`` starts the worker processes itself
(:class:`LocalExecutor`); ``"ray"`` runs each as a Ray task on a cluster
(:mod:`sparsejax.sweep.ray_backend`, the optional extra ``sparsejax[ray]``). Both share the
planning, resuming and ``sweep.json`` bookkeeping here; the local backend never imports ``ray``.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from sparsejax import errors
from sparsejax.run import rundir
from sparsejax.run.rundir import RunDir, SweepDir
from sparsejax.run.signals import DeferredInterrupt
from sparsejax.sweep.executors import Executor, Handle, LocalExecutor, check_backend
from sparsejax.sweep.plan import FINISHED, Run, plan

POLL_S = 0.5
PLAIN_EVERY_S = 5.0  # off a terminal, the sweep's progress line at most this often


class SweepFile:
    """``sweep.json``: one entry per run ever planned in the sweep dir, merged, never wiped."""

    def __init__(self, sweep_dir: Path, recipe: str):
        self.sweep = SweepDir(sweep_dir)
        old = self.sweep.read_sweep() or {}
        self.entries: dict[str, dict[str, Any]] = {
            e["name"]: e for e in old.get("runs", []) if isinstance(e, dict) and "name" in e}
        self.recipe = recipe

    def update(self, name: str, **fields: Any) -> dict[str, Any]:
        entry = self.entries.setdefault(name, {"name": name})
        entry.update(fields)
        if fields.get("status") not in ("failed", "interrupted"):
            entry.pop("reason", None)
        self.sweep.write_sweep({"recipe": self.recipe, "runs": list(self.entries.values())})
        return entry


def _summary_fields(run: RunDir) -> dict[str, Any]:
    s = run.read_summary() or {}
    w = run.read_worker()
    return {"status": s.get("status", "unknown"), "final_val_loss": s.get("final_val_loss"),
            "val_loss_se": s.get("val_loss_se"), "wall_time_s": s.get("wall_time_s"),
            "step": s.get("step"), "process_wall_s": w and w.wall_s, "cpu_s": w and w.cpu_s}


def failure_reason(run: RunDir, returncode: int) -> str:
    """Why a run's worker did not complete: the error its record names
    (:class:`~sparsejax.run.rundir.WorkerRecord`, ``"ErrorType: message"``), else its signal
    or exit status."""
    if returncode < 0:  # killed: whatever record there is belongs to no one
        return f"killed by signal {signal.Signals(-returncode).name}"
    record = run.read_worker()
    if record is None:
        return f"exit status {returncode}; the worker left no record (see {run.worker_log})"
    if record.reason() is not None:
        return record.reason()
    if record.exit in (errors.EXIT_INTERRUPTED, errors.EXIT_TERMINATED):
        name = signal.Signals(record.exit - 128).name
        return f"interrupted ({name}); the next launch resumes it"
    return f"exit status {record.exit} (see {run.worker_log})"


class Progress:
    """A sweep-level progress line on ``stream``: runs done, running, elapsed and an ETA from
    the work done so far this launch (runs weighted by their expected cost, :func:`_cost`;
    running ones count by their last logged step). On a terminal the line is redrawn in
    place; otherwise it is printed after every finished run, and whenever a running run
    logged a step (at most every :data:`PLAIN_EVERY_S` seconds)."""

    def __init__(self, runs: list[Run], stream: TextIO, enabled: bool):
        self.total = sum(r.cost * (1 - r.done_steps / r.spec.train.steps) for r in runs)
        self.n_runs = len(runs)
        self.stream, self.enabled = stream, enabled
        self.tty = enabled and stream.isatty()
        self.plain = enabled and not self.tty
        self._logged: int | None = None  # the running runs' logged steps at the last line
        self._printed = -math.inf  # when the last plain line was printed
        self.t0 = time.monotonic()
        self.finished = self.failed = 0
        self.done_cost = 0.0  # cost of the runs finished this launch

    def line(self, running: list[tuple[Run, Path]]) -> str:
        partial = sum(max(0, RunDir(d).last_logged_step() - r.done_steps)
                      / r.spec.train.steps * r.cost for r, d in running)
        done = self.done_cost + partial
        elapsed = time.monotonic() - self.t0
        frac = min(1.0, done / self.total) if self.total else 1.0
        eta = rundir.duration(elapsed * (self.total - done) / done) if done > 0 else "?"
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        failed = f" ({self.failed} not completed)" if self.failed else ""
        return (f"sweep [{bar}] {self.finished}/{self.n_runs} runs done{failed}, "
                f"{len(running)} running | {rundir.duration(elapsed)} elapsed, ETA {eta}")

    def draw(self, running: list[tuple[Run, Path]]) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line(running))
            self.stream.flush()
        elif self.plain:  # a log file: a line when a run logged a step since the last one
            logged = sum(RunDir(d).last_logged_step() for _, d in running)
            now = time.monotonic()
            if logged and logged != self._logged and now - self._printed >= PLAIN_EVERY_S:
                self._logged, self._printed = logged, now
                self.stream.write(self.line(running) + "\n")
                self.stream.flush()

    def event(self, text: str, running: list[tuple[Run, Path]]) -> None:
        """Print ``text`` (a finished run's line), then the progress line."""
        if self.tty:
            self.stream.write("\r\033[K" + text + "\n" + self.line(running))
        else:
            self.stream.write(text + "\n" + (self.line(running) + "\n" if self.enabled else ""))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def make_executor(backend: str = "local", *, parallel: int | None = None,
                  address: str | None = None) -> Executor:
    """``"local"`` (``parallel`` processes, default 1) or ``"ray"`` (every run submitted as a
    Ray task with the resources of its config; on the cluster at ``address``, or on a local
    one started for the sweep); :class:`~sparsejax.errors.InputError` for anything else."""
    check_backend(backend, parallel, address)
    if backend == "local":
        return LocalExecutor(1 if parallel is None else parallel)
    from sparsejax.sweep import ray_backend  # imports ray: the optional extra

    return ray_backend.RayExecutor(address=address)


def _finish_line(name: str, fields: dict[str, Any], reason: str | None, wall: float) -> str:
    status = fields["status"]
    if status == "completed":
        loss, se = fields.get("final_val_loss"), fields.get("val_loss_se")
        loss_s = "n/a" if loss is None else f"{rundir.number(loss):.4f}"
        se_s = "" if se is None else f"±{rundir.number(se):.4f}"
        return f"done {name} loss={loss_s}{se_s} in {wall:.1f}s"
    if status == "diverged":
        return f"diverged {name} at step {fields.get('step')} in {wall:.1f}s"
    return f"{status} {name} in {wall:.1f}s: {reason}"


def launch(recipe: str, sweep_dir: str | Path, *, extra: dict[str, Any] | None = None,
           only: str | None = None, parallel: int | None = None, dry_run: bool = False,
           progress: bool = True, stream: TextIO | None = None, backend: str = "local",
           address: str | None = None, executor: Executor | None = None
           ) -> list[dict[str, Any]]:
    """Run (or with ``dry_run`` only list) the sweep's runs; returns one entry per planned run
    (``name``, ``action``, ``overrides`` and, unless ``dry_run``, its ``sweep.json`` fields:
    ``status``, ``final_val_loss``, ``val_loss_se``, ``wall_time_s``, ``reason``).

    Finished-run lines and the progress line go to ``stream`` (default stderr). A run that
    fails is marked ``failed`` with the reason (:func:`failure_reason`: the error its worker
    recorded in ``worker.json``) and the others go on. ``KeyboardInterrupt`` (Ctrl-C, or
    SIGTERM: :class:`~sparsejax.errors.Interrupted`) forwards SIGINT to the running workers
    (each saves a checkpoint at its next step boundary), marks them ``interrupted`` and
    propagates.

    ``backend``/``parallel``/``address``: see :func:`make_executor`; ``executor`` replaces
    them (tests pass their own)."""
    if executor is None:  # checked before anything is planned; started under the lock
        check_backend(backend, parallel, address)
    sweep_dir = Path(sweep_dir)
    runs = plan(recipe, sweep_dir, extra=extra, only=only)
    if dry_run:
        return [{"name": r.name, "action": r.action, "overrides": r.overrides,
                 "done_steps": r.done_steps, "steps": r.spec.train.steps} for r in runs]
    stream = sys.stderr if stream is None else stream
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = SweepDir(sweep_dir).lock().__enter__()
    except errors.RunDirBusyError:
        raise errors.RunDirBusyError(
            f"sweep dir {sweep_dir} is in use by another sweep (process "
            f"{SweepDir(sweep_dir).lock_owner()}); wait for it to end or stop it") from None
    try:
        if executor is None:
            executor = make_executor(backend, parallel=parallel, address=address)
        try:  # SIGTERM (a preempted sweep job) stops the sweep like Ctrl-C
            with DeferredInterrupt():
                return _execute(runs, sweep_dir, SweepFile(sweep_dir, recipe), executor,
                                Progress(runs, stream, progress))
        finally:
            executor.close()
    finally:
        lock.__exit__()


def _execute(runs: list[Run], sweep_dir: Path, book: SweepFile, executor: Executor,
             bar: Progress) -> list[dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for r in runs:
        fields = _summary_fields(RunDir(sweep_dir / r.name)) if r.action == "skip" else {
            "status": "pending"}
        entries[r.name] = book.update(r.name, overrides=r.overrides, action=r.action, **fields)
    # longest first (by remaining expected cost): the shortest makespan on parallel slots
    pending = sorted((r for r in runs if r.action != "skip"),
                     key=lambda r: -r.cost * (1 - r.done_steps / r.spec.train.steps))
    bar.n_runs = len(pending)
    executor.check(pending)
    free = list(range(min(executor.slots, len(pending))))
    running: dict[int, tuple[Run, Handle, float]] = {}

    def fill() -> None:
        while pending and free:
            slot = free.pop(0)
            r = pending.pop(0)
            RunDir(sweep_dir / r.name).clear_worker()  # the record read at its end is its own
            proc = executor.start(r, sweep_dir / r.name, slot)
            running[slot] = (r, proc, time.monotonic())
            book.update(r.name, status="running")

    def in_flight() -> list[tuple[Run, Path]]:
        return [(x, sweep_dir / x.name) for x, _, _ in running.values()]

    try:
        while pending or running:
            fill()
            time.sleep(POLL_S)
            lines = []
            for slot, (r, proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                free.append(slot)
                wall = time.monotonic() - t0
                run = RunDir(sweep_dir / r.name)
                fields = _summary_fields(run)
                reason = None
                if proc.returncode != 0 or fields["status"] not in FINISHED:
                    if fields["status"] not in ("diverged", "interrupted"):
                        fields["status"] = "failed"  # whatever the run dir says
                    if fields["status"] != "diverged":
                        reason = failure_reason(run, proc.returncode)
                entries[r.name] = book.update(r.name, reason=reason, **fields)
                bar.finished += 1
                bar.failed += fields["status"] != "completed"
                bar.done_cost += r.cost * (1 - r.done_steps / r.spec.train.steps)
                lines.append(_finish_line(r.name, fields, reason, wall))
            if lines:
                fill()  # the next runs start before the progress line counts them
            for line in lines:
                bar.event(line, in_flight())
            bar.draw(in_flight())
    except KeyboardInterrupt:
        for _r, proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for r, proc, _ in running.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            fields = _summary_fields(RunDir(sweep_dir / r.name))
            if fields["status"] not in FINISHED:  # it may have finished before the signal
                fields["status"] = "interrupted"
            entries[r.name] = book.update(r.name, **fields)
        raise
    finally:
        bar.close()
    return [{**entries[r.name]} for r in runs]
