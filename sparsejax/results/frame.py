"""A sweep dir as a pandas DataFrame: one row per run (docs/design.md, "Results")."""

from __future__ import annotations

from typing import Any

import pandas as pd

from sparsejax import errors
from sparsejax.run.rundir import PathLike, RunDir, SweepDir

NON_FINITE = ("nan", "inf", "-inf")  # how run-dir JSON files store non-finite floats


def sweep_runs(sweep_dir: PathLike) -> list[tuple[str, dict[str, Any]]]:
    """``(name, sweep.json entry)`` of every run of a sweep dir: ``sweep.json``'s runs in its
    order (pending ones too), then run dirs it does not list, by name (a soup, a sweep dir
    without ``sweep.json``). :class:`~sparsejax.errors.InputError` naming the folder when it
    holds no run."""
    sweep = SweepDir(sweep_dir)
    if not sweep.path.is_dir():
        raise errors.MissingInputError(f"{sweep.path} is not a folder")
    book = [e for e in (sweep.read_sweep() or {}).get("runs", [])
            if isinstance(e, dict) and isinstance(e.get("name"), str)]
    listed = {e["name"] for e in book}
    entries = [(e["name"], e) for e in book]
    entries += [(r.name, {}) for r in sweep.runs() if r.name not in listed]
    if not entries:
        raise errors.InputError(f"{sweep.path} is not a sweep dir: no {SweepDir.SWEEP} and no "
                                f"run dir (a sub-folder with a {RunDir.SUMMARY}) in it")
    return entries


def _scalar(value: Any) -> Any:
    """A summary field as a table cell: non-finite strings as floats."""
    if isinstance(value, str) and value in NON_FINITE:
        return float(value)
    return value


def sweep_frame(sweep_dir: PathLike) -> pd.DataFrame:
    """The runs of ``sweep_dir`` as a DataFrame indexed by run name: ``status`` (``completed``,
    ``running``, ``failed``, ``diverged``, ``interrupted`` as :meth:`RunDir.status
    <sparsejax.run.rundir.RunDir.status>` reads it, or ``sweep.json``'s ``pending`` for a run
    that has not started), the run's overrides as columns named by their dotted keys
    (``model.size``, ``sparsity.final``, ``train.steps``, ...), then every scalar field of its
    ``summary.json`` (``val_loss``, ``val_loss_se``, ``tokens``, ``n_avg``, ``flops``,
    ``wall_time_s``, ...; ``"nan"``/``"inf"`` as floats). A field a run lacks is missing
    (``NaN``/``None``). :class:`~sparsejax.errors.InputError` when the folder holds no run.

    >>> df = sweep_frame("runs/journey_quick")  # doctest: +SKIP
    >>> df.groupby("model.size")["val_loss"].min()  # doctest: +SKIP
    """
    rows, overrides, fields = [], [], []
    for name, entry in sweep_runs(sweep_dir):
        run = SweepDir(sweep_dir).run(name)
        row: dict[str, Any] = {"run": name}
        if run.has_summary():
            row["status"] = run.status().status
            summary = run.read_summary() or {}
        else:
            row["status"] = str(entry.get("status", "pending"))
            summary = {}
        for key, value in (entry.get("overrides") or {}).items():
            row[key] = value
            if key not in overrides:
                overrides.append(key)
        for key, value in summary.items():
            if key == "status" or key in row or isinstance(value, dict | list):
                continue  # a container is no table cell
            row[key] = _scalar(value)
            if key not in fields:
                fields.append(key)
        rows.append(row)
    columns = ["run", "status", *sorted(overrides), *sorted(fields)]
    return pd.DataFrame(rows, columns=columns).set_index("run")

