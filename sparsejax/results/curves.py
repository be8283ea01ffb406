"""A metric of ``metrics.jsonl`` against step, tokens or FLOPs, for a run or a sweep's runs.

A run dir gives one :class:`Curve`; a sweep dir one per run that logged the metric, each with
its values of the sweep's *axes*: the override keys whose values differ between the sweep's
runs (``model.size``, ``sparsity.final``, ``train.steps`` for the Journey sweeps), in
:data:`AXIS_ORDER` first. Runs that logged nothing yet (pending, just started) or not this
metric are listed in :attr:`Curves.skipped`; a run dir or sweep where nothing logged it is an
:class:`~sparsejax.errors.InputError` naming the path, the metric and what was logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scaling.plots import loss_unit
from sparsejax import errors
from sparsejax.results.frame import sweep_runs
from sparsejax.run.rundir import PathLike, RunDir, SweepDir, number

METRICS = ("val_loss", "train_loss", "sparsity", "n_avg", "mfu")
XS = ("step", "tokens", "flops")
LOSSES = ("val_loss", "train_loss")
# the Journey sweeps' axes, in this order (colour, line style, marker); others follow by name
AXIS_ORDER = ("model.size", "sparsity.final", "train.steps")
AXIS_NAMES = {"model.size": "size", "sparsity.final": "sparsity", "train.steps": "steps",
              "sparsity.method": "method"}


class Curve(NamedTuple):
    """One run's ``metric`` against ``x`` (the logged records that have both)."""

    name: str  # the run dir's name
    x: np.ndarray  # shape=(n,), float64
    y: np.ndarray  # shape=(n,), float64
    se: np.ndarray | None  # shape=(n,): val_loss_se of a val_loss curve, else None
    axes: dict[str, Any]  # the run's value of each sweep axis ({} for a lone run)


class Curves(NamedTuple):
    """What :func:`read_curves` read: a run's curve, or a sweep's, and how to label them."""

    path: Path
    kind: str  # "run" or "sweep"
    metric: str
    x: str
    curves: list[Curve]
    axes: list[str]  # the sweep's axes (override keys), colour first
    unit: str | None  # the loss unit ("nats/byte", "nats/token"), None for other metrics
    skipped: list[str]  # "run (why)" for each run of a sweep with no such curve


def _check(metric: str, x: str) -> None:
    if metric not in METRICS:
        raise errors.InputError(f"--metric must be one of {', '.join(METRICS)}; got {metric!r}")
    if x not in XS:
        raise errors.InputError(f"--x must be one of {', '.join(XS)}; got {x!r}")


def _logged(records: list[dict[str, Any]]) -> list[str]:
    keys = {k for r in records for k, v in r.items() if v is not None}
    return [k for k in (*METRICS, *XS) if k in keys]


def run_curve(run: RunDir, metric: str, x: str, axes: dict[str, Any] | None = None) -> Curve:
    """``run``'s ``metric`` against ``x``; :class:`~sparsejax.errors.InputError` naming the run
    when it logged no record, or none with the metric."""
    records = run.read_metrics()
    if not records:
        raise errors.InputError(f"{run.path} has no logged metrics yet ({RunDir.METRICS} is "
                                "missing or empty): the run has not reached its first log step")
    rows = [r for r in records if r.get(metric) is not None and r.get(x) is not None]
    if not rows:
        raise errors.InputError(f"{run.path}: no record of {RunDir.METRICS} has {metric!r} "
                                f"with {x!r} (it logged: {', '.join(_logged(records))})")
    y = np.asarray([number(r[metric]) for r in rows], np.float64)
    se = None
    if metric == "val_loss":
        se = np.asarray([number(r.get("val_loss_se")) if r.get("val_loss_se") is not None
                         else np.nan for r in rows], np.float64)
        se = None if np.isnan(se).all() else se
    xs = np.asarray([number(r[x]) for r in rows], np.float64)
    return Curve(run.name, xs, y, se, dict(axes or {}))


def _unit(runs: list[RunDir], metric: str) -> str | None:
    if metric not in LOSSES:
        return None
    units: dict[str | None, list[str]] = {}
    for run in runs:
        units.setdefault(loss_unit((run.read_config() or {}).get("data")), []).append(run.name)
    if len(units) > 1:
        raise errors.InputError("the runs' losses have different units (" + "; ".join(
            f"{u or 'unknown'}: {', '.join(names)}" for u, names in units.items())
            + "); plot them separately")
    return next(iter(units))


def sweep_axes(overrides: dict[str, dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between runs, :data:`AXIS_ORDER` first (always
    kept); another key that groups the runs exactly as an earlier one does
    (``sparsity.method`` beside ``sparsity.final`` when every pruned run uses one method) is
    left out."""
    keys = {k for o in overrides.values() for k in o}
    varying = sorted((k for k in keys if len({repr(o.get(k)) for o in overrides.values()}) > 1),
                     key=lambda k: (AXIS_ORDER.index(k) if k in AXIS_ORDER
                                    else len(AXIS_ORDER), k))
    axes, partitions = [], []
    for key in varying:
        groups: dict[str, set[str]] = {}
        for name, o in overrides.items():
            groups.setdefault(repr(o.get(key)), set()).add(name)
        partition = {frozenset(g) for g in groups.values()}
        if key in AXIS_ORDER or partition not in partitions:
            axes.append(key)
            partitions.append(partition)
    return axes


def read_curves(path: PathLike, metric: str = "val_loss", x: str = "step") -> Curves:
    """The ``metric`` curves of a run dir (one) or of a sweep dir (each run that logged it):
    see the module docstring."""
    _check(metric, x)
    path = Path(path)
    if not path.exists():
        raise errors.MissingInputError(f"{path} does not exist (give a run dir or a sweep dir)")
    if not path.is_dir():
        raise errors.InputError(f"{path} is not a folder (give a run dir or a sweep dir)")
    run = RunDir(path)
    if run.has_summary() or run.metrics_file.exists():
        curve = run_curve(run, metric, x)
        return Curves(path, "run", metric, x, [curve], [], _unit([run], metric), [])
    if not SweepDir(path).sweep_file.exists() and not SweepDir(path).runs():
        raise errors.InputError(f"{path} is neither a run dir (no {RunDir.SUMMARY} or "
                                f"{RunDir.METRICS}) nor a sweep dir (no {SweepDir.SWEEP}, no "
                                "run dirs in it)")
    entries = sweep_runs(path)
    overrides = {name: dict(e.get("overrides") or {}) for name, e in entries}
    axes = sweep_axes(overrides)
    curves, skipped, runs = [], [], []
    for name, _ in entries:
        run = SweepDir(path).run(name)
        if not run.read_metrics():
            skipped.append(f"{name} (nothing logged yet)")
            continue
        try:
            curves.append(run_curve(run, metric, x, {k: overrides[name].get(k) for k in axes}))
        except errors.InputError:
            skipped.append(f"{name} (no {metric!r})")
            continue
        runs.append(run)
    if not curves:
        raise errors.InputError(f"no run of sweep {path} logged {metric!r} against {x!r} "
                                f"(skipped: {', '.join(skipped)})")
    return Curves(path, "sweep", metric, x, curves, axes, _unit(runs, metric), skipped)
