"""Where a sweep's runs execute: worker processes on this machine (:class:`LocalExecutor`,
pinned to core slots) or Ray tasks (:mod:`sparsejax.sweep.ray_backend`, optional extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from sparsejax import errors
from sparsejax.run.rundir import RunDir
from sparsejax.sweep.plan import Run

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def core_slots(parallel: int, cores: list[int] | None = None) -> list[list[int]]:
    """Split the usable cores into ``parallel`` disjoint, equal slots (a process per slot);
    with more processes than cores, slots share cores round-robin, one core each."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise errors.InputError(f"--parallel must be an int >= 1, got {parallel!r}")
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    share = len(cores) // parallel
    if share == 0:
        return [[cores[i % len(cores)]] for i in range(parallel)]
    return [cores[i * share:(i + 1) * share] for i in range(parallel)]


def worker_env(n_threads: int | None, base: dict[str, str] | None = None, *,
               parallel: int = 1) -> dict[str, str]:
    """The environment of a worker process. With ``n_threads`` (a share of the cores), the
    thread pools that read the environment are bounded to it: OpenMP/MKL/OpenBLAS (numpy)
    and numba. XLA:CPU reads no such variable (``XLA_FLAGS``' ``intra_op_parallelism_threads``
    is not honoured by the PjRt CPU client): its thread pool is sized from the process's CPU
    affinity, which the worker sets to its slot (``os.sched_setaffinity``) before JAX starts,
    and the affinity also bounds every other thread of the process. ``XLA_FLAGS`` is left
    alone: it is part of the persistent compilation cache's key, so workers keep hitting the
    cache the parent's runs filled. On a GPU, ``parallel`` processes share its memory: each
    preallocates ``0.9 / parallel`` of it (``XLA_PYTHON_CLIENT_MEM_FRACTION``, unless set).
    The package's own folder goes first on ``PYTHONPATH`` so the worker imports the same
    ``sparsejax``."""
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if n_threads is not None:
        for key in THREAD_ENV:
            env[key] = str(n_threads)
    if parallel > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env:  # GPU: share its memory
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / parallel:.3f}"
    return env


def start_worker(run: Run, run_dir: Path, cores: list[int] | None, n_threads: int | None,
                 parallel: int) -> subprocess.Popen:
    """Start ``python -m sparsejax.sweep.worker RUN_DIR`` (the config on its stdin), its output
    appended to the run dir's worker log, in a session of its own: a terminal's Ctrl-C (SIGINT
    to the sweep's process group) reaches only the sweep, which forwards one SIGINT, so the
    worker saves at its next step boundary (a second signal would stop it at once)."""
    rd = RunDir(run_dir).create()
    argv = [sys.executable, "-m", "sparsejax.sweep.worker", str(run_dir),
            "--parent", str(os.getpid())]
    if cores is not None:
        argv += ["--cores", ",".join(map(str, cores))]
    with rd.worker_log.open("a") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {run.action} {run.name}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                env=worker_env(n_threads, parallel=parallel), text=True,
                                start_new_session=True)
    proc.stdin.write(json.dumps(run.spec.to_dict()))
    proc.stdin.close()
    return proc


class Handle(Protocol):
    """A started run, as :func:`_execute` watches it (``subprocess.Popen`` is one)."""

    returncode: int | None  # the worker's exit status once :meth:`poll` saw it end

    def poll(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...


class Executor(Protocol):
    """Where a sweep's runs go: ``slots`` runs at once; :meth:`start` launches one run's
    worker (``python -m sparsejax.sweep.worker RUN_DIR``, config on stdin) in ``slot``."""

    slots: int

    def check(self, runs: list[Run]) -> None: ...
    def start(self, run: Run, run_dir: Path, slot: int) -> Handle: ...
    def close(self) -> None: ...


class LocalExecutor:
    """Worker processes on this machine, ``parallel`` at once, each pinned to its share of
    the cores (:func:`core_slots`) when there are several."""

    def __init__(self, parallel: int = 1):
        self.cores = core_slots(parallel)
        self.slots = parallel

    def check(self, runs: list[Run]) -> None:
        del runs  # any run fits: it gets its share of this machine

    def start(self, run: Run, run_dir: Path, slot: int) -> subprocess.Popen:
        pin = self.slots > 1  # one process: it gets every core, nothing to split
        cores = self.cores[slot] if pin else None
        return start_worker(run, run_dir, cores, len(cores) if pin else None, self.slots)

    def close(self) -> None:
        pass


BACKENDS = ("local", "ray")


def check_backend(backend: str, parallel: int | None, address: str | None) -> None:
    """:class:`~sparsejax.errors.InputError` naming the flag for a backend/flag combination
    that cannot work."""
    if backend not in BACKENDS:
        raise errors.InputError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "local":
        if address is not None:
            raise errors.InputError("--address is for --backend ray (the Ray cluster to use)")
        core_slots(1 if parallel is None else parallel)  # checks --parallel
    elif parallel is not None:
        raise errors.InputError("--parallel is for --backend local; Ray runs as many runs at "
                                "once as the cluster's resources allow (resources.cpus / "
                                "resources.gpus of each run's config)")
