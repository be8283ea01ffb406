"""One run of a sweep, in its own process: ``python -m sparsejax.sweep.worker RUN_DIR``.

Started by :func:`sparsejax.sweep.launch`, which writes the run's resolved config as JSON to
the worker's stdin. Before JAX starts, the worker pins itself to its share of the cores
(``--cores``: XLA:CPU sizes its thread pool from the CPU affinity) and asks the kernel to
signal it when the sweep process dies (``--parent``; Linux ``PR_SET_PDEATHSIG``, turned into
one SIGINT), so a killed sweep leaves no orphan training: the run stops at the next step
boundary, keeps its checkpoints, and the next launch resumes it. ``RUN_DIR/worker.json``
(:class:`~sparsejax.run.rundir.WorkerRecord`) records the exit status, the process's wall and
CPU seconds (what a run costs on a dedicated core) and, when the run failed, the error's type
and message, which the sweep reports as the run's failure reason. Exit status 0 when the run
completed, 130 when interrupted (143 by SIGTERM), else the error's (:mod:`sparsejax.errors`:
2 for a bad config or input, 1 for a run that failed or diverged, and for any other
exception); the log's last line is then ``sparsejax: error: ...``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import signal
import sys
import time
import traceback
from typing import NamedTuple

from sparsejax import errors
from sparsejax.run.rundir import RunDir, WorkerRecord

PR_SET_PDEATHSIG = 1


class Outcome(NamedTuple):
    """How the training in this process ended."""

    exit: int  # the process's exit status
    error_type: str | None = None  # the exception's class name, when one failed the run
    error: str | None = None  # its message, on one line


def _die_with_parent(parent: int) -> None:
    """One SIGINT when the parent process ends (Linux only; elsewhere a no-op).

    The kernel sends the death signal each time the child is re-parented through one of the
    dying parent's threads (a sweep process has several), so it is a SIGUSR1 whose handler
    raises SIGINT once: a second SIGINT would cut short the final checkpoint save."""
    if not sys.platform.startswith("linux"):
        return
    fired: list[bool] = []

    def on_parent_death(signum, frame) -> None:
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGUSR1, on_parent_death)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the call: stop now
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Train the run; write its :class:`~sparsejax.run.rundir.WorkerRecord` (exit status,
    wall and CPU seconds of the whole process, cores, the error that failed the run) whatever
    happens."""
    p = argparse.ArgumentParser(prog="python -m sparsejax.sweep.worker")
    p.add_argument("run_dir")
    p.add_argument("--cores", default=None, help="comma-separated CPU ids to run on")
    p.add_argument("--parent", type=int, default=None, help="the sweep's PID")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    outcome = _train(args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    RunDir(args.run_dir).write_worker(WorkerRecord(
        exit=outcome.exit, wall_s=time.monotonic() - t0, cpu_s=usage.ru_utime + usage.ru_stime,
        cores=sorted(os.sched_getaffinity(0)), pid=os.getpid(), error_type=outcome.error_type,
        error=outcome.error))
    return outcome.exit


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _train(args: argparse.Namespace) -> Outcome:
    # SIGINT stops the run at a step boundary even when the starting process blocks or
    # ignores it (Ray workers do; a child inherits both, and Python then never raises on it)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGUSR1})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.cores:
            os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
        if args.parent is not None:
            _die_with_parent(args.parent)
        import ml_collections  # after the affinity is set: XLA sizes its CPU pool on start

        from sparsejax.run import experiment

        config = ml_collections.ConfigDict(json.loads(sys.stdin.read()))
        summary = experiment.run(config, args.run_dir, progress=False)
    except KeyboardInterrupt as stop:  # SIGINT or SIGTERM: 128 + the signal
        print("sparsejax: interrupted", file=sys.stderr, flush=True)
        return Outcome(getattr(stop, "exit_code", errors.EXIT_INTERRUPTED))
    except Exception as e:  # the sweep records the reason and goes on with the other runs
        traceback.print_exc()
        outcome = Outcome(e.exit_code if isinstance(e, errors.SparsejaxError)
                          else errors.EXIT_RUN_FAILED, type(e).__name__, _one_line(str(e)))
        print(f"sparsejax: error: {outcome.error_type}: {outcome.error}", file=sys.stderr,
              flush=True)
        return outcome
    if summary["status"] != "completed":
        error = f"run {summary['status']} at step {summary.get('step')}"
        print(f"sparsejax: error: {error}", file=sys.stderr, flush=True)
        return Outcome(errors.EXIT_RUN_FAILED, None, error)
    print(f"completed: val_loss {summary.get('final_val_loss')} ± {summary.get('val_loss_se')}",
          flush=True)
    return Outcome(0)


if __name__ == "__main__":
    sys.exit(main())
