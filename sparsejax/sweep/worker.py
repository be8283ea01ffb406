"""One run of a sweep, in its own process: ``python -m sparsejax.sweep.worker RUN_DIR``.

Started by :func:`sparsejax.sweep.launch`, which writes the run's resolved config as JSON to
the worker's stdin. Before JAX starts, the worker pins itself to its share of the cores
(``--cores``: XLA:CPU sizes its thread pool from the CPU affinity) and asks the kernel to
signal it when the sweep process dies (``--parent``; Linux ``PR_SET_PDEATHSIG``, turned into
one SIGINT), so a killed sweep leaves no orphan training: the run stops at the next step
boundary, keeps its checkpoints, and the next launch resumes it. ``RUN_DIR/worker.json``
records the process's wall and CPU seconds (what a run costs on a dedicated core). Exit
status 0 when the run completed, 1 when it diverged or failed (the last line is then
``sparsejax: error: ...``), 130 when interrupted.
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
from pathlib import Path

PR_SET_PDEATHSIG = 1


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
    """Train the run; write ``RUN_DIR/worker.json`` (exit status, wall and CPU seconds of the
    whole process, cores) whatever happens."""
    p = argparse.ArgumentParser(prog="python -m sparsejax.sweep.worker")
    p.add_argument("run_dir")
    p.add_argument("--cores", default=None, help="comma-separated CPU ids to run on")
    p.add_argument("--parent", type=int, default=None, help="the sweep's PID")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    status = _train(args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {"exit": status, "wall_s": time.monotonic() - t0,
              "cpu_s": usage.ru_utime + usage.ru_stime,
              "cores": sorted(os.sched_getaffinity(0)), "pid": os.getpid()}
    tmp = Path(args.run_dir) / "worker.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, Path(args.run_dir) / "worker.json")
    return status


def _train(args: argparse.Namespace) -> int:
    # SIGINT stops the run at a step boundary even when the starting process blocks or
    # ignores it (Ray workers do; a child inherits both, and Python then never raises on it)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGUSR1})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.cores:
            os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
        if args.parent is not None:
            _die_with_parent(args.parent)
        import ml_collections  # after the affinity is set: JAX sizes its pools on import

        from sparsejax.run import experiment

        config = ml_collections.ConfigDict(json.loads(sys.stdin.read()))
        summary = experiment.run(config, args.run_dir, progress=False)
    except KeyboardInterrupt:
        print("sparsejax: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # the sweep records the reason and goes on with the other runs
        traceback.print_exc()
        print(f"sparsejax: error: {type(e).__name__}: {' '.join(str(e).split())}",
              file=sys.stderr, flush=True)
        return 1
    if summary["status"] != "completed":
        print(f"sparsejax: error: run {summary['status']} at step {summary.get('step')}",
              file=sys.stderr, flush=True)
        return 1
    print(f"completed: val_loss {summary.get('final_val_loss')} ± {summary.get('val_loss_se')}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
