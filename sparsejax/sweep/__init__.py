"""Sweeps: every run a recipe's ``sweep(add)`` lists, one run dir and one process each.

:mod:`~sparsejax.sweep.plan` resolves and checks the runs and decides what a launch does with
each; :mod:`~sparsejax.sweep.executors` starts workers here or on Ray
(:mod:`~sparsejax.sweep.ray_backend`, optional); :mod:`~sparsejax.sweep.launcher` runs the
sweep and keeps ``sweep.json``; :mod:`~sparsejax.sweep.worker` is one run's process.
"""

from sparsejax.sweep.executors import (
    THREAD_ENV,
    Executor,
    Handle,
    LocalExecutor,
    check_backend,
    core_slots,
    worker_env,
)
from sparsejax.sweep.launcher import launch, make_executor
from sparsejax.sweep.plan import Run, configs, load_recipe, plan, run_name

__all__ = [
    "THREAD_ENV", "Executor", "Handle", "LocalExecutor", "Run", "check_backend", "configs",
    "core_slots", "launch", "load_recipe", "make_executor", "plan", "run_name", "worker_env",
]
