"""Sweeps on a Ray cluster: ``sparsejax sweep --backend ray [--address ADDR]``.

Each run of the sweep is one Ray task (Moritz et al. 2018, "Ray: A Distributed Framework for
Emerging AI Applications") asking for the run's ``resources.cpus`` and ``resources.gpus``;
the task starts the same worker process as the local backend (``python -m
sparsejax.sweep.worker RUN_DIR``, :func:`sparsejax.sweep.executors.start_worker`), so run
dirs, locks,
``worker.log``, resuming and ``sweep.json`` are exactly the local backend's (planning and
bookkeeping stay in :mod:`sparsejax.sweep`, on the machine that launches the sweep). Every
run is submitted at once; Ray runs as many as the cluster's free resources allow.

The sweep dir must be on a filesystem every node of the cluster sees (the tasks write there),
and every node needs ``sparsejax`` installed. Without ``address`` a local Ray instance is
started for the sweep (and stopped after it), with this checkout on its workers' path.

Stopping: Ctrl-C cancels the tasks (``ray.cancel``: a ``KeyboardInterrupt`` in the task,
which forwards SIGINT to its worker: the run stops at the next step boundary and keeps its
checkpoints); a task whose Ray worker dies takes its worker process along (the worker's
parent-death signal), and Ray retries tasks lost to a failed node, which resume from their
checkpoints. Relaunching the same command resumes the sweep.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import ray

from sparsejax import errors
from sparsejax.run.rundir import RunDir, WorkerRecord
from sparsejax.sweep.executors import start_worker
from sparsejax.sweep.plan import Run

CANCELLED = errors.EXIT_INTERRUPTED  # the exit status of a worker stopped by SIGINT
POLL_S = 0.2


def _run_worker(run: Run, run_dir: str, n_threads: int) -> int:
    """Inside a Ray worker: one sweep worker process for ``run``; its exit status.

    A cancelled task forwards SIGINT to the worker and waits for its checkpoint to land."""
    proc = start_worker(run, Path(run_dir), None, n_threads, 1)
    try:  # short sleeps, not one blocking wait: ray.cancel's exception lands between them
        while proc.poll() is None:
            time.sleep(POLL_S)
        return proc.returncode
    except KeyboardInterrupt:  # ray.cancel
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


_task = ray.remote(_run_worker)


class RayHandle:
    """A run submitted as a Ray task, watched like a ``subprocess.Popen``."""

    def __init__(self, ref: Any, run_dir: Path):
        self.ref, self.run_dir = ref, run_dir
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _ = ray.wait([self.ref], timeout=0)
            if ready:
                self.returncode = self._result()
        return self.returncode

    def _result(self) -> int:
        try:
            return int(ray.get(self.ref))
        except ray.exceptions.TaskCancelledError:
            return CANCELLED
        except ray.exceptions.RayError as e:  # the task itself failed: its record says why
            line = " ".join(str(e).split())[:500]
            RunDir(self.run_dir).write_worker(WorkerRecord(
                exit=errors.EXIT_RUN_FAILED, error_type=f"ray.{type(e).__name__}", error=line))
            return errors.EXIT_RUN_FAILED

    def send_signal(self, sig: int) -> None:
        """SIGINT: cancel the task (its worker stops at the next step boundary)."""
        if sig != signal.SIGINT:
            raise ValueError(f"a Ray run takes only SIGINT, got {sig}")  # a caller's bug
        ray.cancel(self.ref)

    def wait(self, timeout: float | None = None) -> int:
        ready, _ = ray.wait([self.ref], timeout=timeout)
        if not ready:
            raise subprocess.TimeoutExpired(f"ray task of {self.run_dir}", timeout)
        return self.poll()

    def kill(self) -> None:
        ray.cancel(self.ref, force=True)


class RayExecutor:
    """Every run as a Ray task (:mod:`sparsejax.sweep.ray_backend`) on the cluster at
    ``address``, or on a local Ray instance started here (``init_kwargs`` go to ``ray.init``, e.g.
    ``num_cpus``)."""

    slots = 2**20  # no cap here: Ray schedules by resources

    def __init__(self, address: str | None = None, **init_kwargs: Any):
        self.started = not ray.is_initialized()
        if self.started:
            if address is None:  # a local instance: its workers import this checkout
                root = str(Path(__file__).resolve().parents[2])
                path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
                init_kwargs.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": path}})
                init_kwargs.setdefault("include_dashboard", False)
            ray.init(address=address, log_to_driver=False, **init_kwargs)

    def check(self, runs: list[Run]) -> None:
        """:class:`~sparsejax.errors.ConfigError` naming ``resources.*`` for a run no node of
        the cluster can host (Ray would queue it forever)."""
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        for r in runs:
            need = {"CPU": r.spec.resources.cpus, "GPU": r.spec.resources.gpus}
            if not any(all(have.get(k, 0.0) >= v for k, v in need.items() if v)
                       for have in nodes):
                biggest = max(((h.get("CPU", 0.0), h.get("GPU", 0.0)) for h in nodes),
                              default=(0.0, 0.0))
                raise errors.ConfigError(
                    f"run {r.name}: resources.cpus={need['CPU']}, resources.gpus={need['GPU']}"
                    f" fit on no node of the Ray cluster (the largest has {biggest[0]:g} CPUs,"
                    f" {biggest[1]:g} GPUs)")

    def start(self, run: Run, run_dir: Path, slot: int) -> RayHandle:
        del slot
        run_dir.mkdir(parents=True, exist_ok=True)
        res = run.spec.resources
        ref = _task.options(num_cpus=res.cpus, num_gpus=res.gpus, name=run.name).remote(
            run, str(run_dir.absolute()), max(1, math.ceil(res.cpus)))
        return RayHandle(ref, run_dir)

    def close(self) -> None:
        if self.started:
            ray.shutdown()
