"""Turn a sweep directory, a CSV file or a pandas DataFrame into the table a fit takes.

A sweep dir (docs/design.md, "Run directory") holds one run dir per run, each with a
``summary.json`` written by the trainer (status, step, tokens, train_loss, val_loss, n_params,
n_active, n_avg, flops, sparsity, density, ...), plus an optional ``sweep.json``. A row is one
run: ``loss = val_loss``, ``D = tokens`` and ``N`` the chosen count: ``n_avg`` (the average
parameter count over training, Jin et al. 2025; the default), ``n_params`` or ``n_active``.
Diverged runs (status ``"diverged"``, a ``"diverged": true`` flag, or a non-finite val_loss,
which summaries store as the string ``"nan"``/``"inf"``) are skipped with a warning naming them.
A CSV or DataFrame either has the columns ``N, D, loss`` (and optionally ``S``/``sparsity``)
or the summary keys above; optional columns ``name``/``run`` (row labels), ``se``/``val_loss_se``
(standard error of the loss), ``weight`` (per-point weights) and ``n_params`` are kept.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scaling.fit import BadPoint, check_points

N_KEYS = ("n_avg", "n_params", "n_active")


class MissingField(ValueError):
    """A record (a run's summary, a CSV row) lacks a field the table needs."""


class ScalingTable(NamedTuple):
    N: np.ndarray  # shape=(n,), float64
    D: np.ndarray  # shape=(n,), float64 (tokens)
    loss: np.ndarray  # shape=(n,), float64
    S: np.ndarray | None  # shape=(n,): final sparsity, when the source has it
    names: tuple[str, ...]  # run names (sweep dir) or row labels
    n_key: str  # which count N is
    se: np.ndarray | None = None  # standard error of each loss (val_loss_se), when known
    weight: np.ndarray | None = None  # a CSV's own ``weight`` column, when it has one
    n_total: np.ndarray | None = None  # total parameters (n_params), when known

    def subset(self, rows) -> ScalingTable:
        """The table restricted to ``rows`` (a boolean mask or indices)."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return self._replace(N=self.N[idx], D=self.D[idx], loss=self.loss[idx], S=pick(self.S),
                             names=tuple(self.names[i] for i in idx), se=pick(self.se),
                             weight=pick(self.weight), n_total=pick(self.n_total))


def _num(value: Any, field: str, where: str) -> float:
    if value is None or isinstance(value, bool):
        raise ValueError(f"{where}: field {field!r} is missing or null")
    try:
        out = float(value)  # "nan"/"inf" strings (how summaries store non-finite floats)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field {field!r} is not a number: {value!r}") from None
    return out


def _rows_from_records(records, names, n_key, where):
    n_key = n_key or "n_avg"
    if n_key not in N_KEYS:
        raise ValueError(f"n_key must be one of {N_KEYS}; got {n_key!r}")
    n, d, loss, s = [], [], [], []
    for rec, name in zip(records, names, strict=True):
        at = f"{where} {name}"
        for field in (n_key, "tokens"):
            if field not in rec:
                raise MissingField(f"{at}: missing field {field!r} (has {sorted(rec)})")
        lv = rec.get("val_loss", rec.get("final_val_loss"))
        n.append(_num(rec[n_key], n_key, at))
        d.append(_num(rec["tokens"], "tokens", at))
        loss.append(_num(lv, "val_loss", at))
        s.append(_num(rec["sparsity"], "sparsity", at) if rec.get("sparsity") is not None else 0.0)
    return n, d, loss, s


def _optional(records, names, field: str, where: str) -> np.ndarray | None:
    """A per-record number that every record has (else None): val_loss_se, n_params."""
    if not records or any(rec.get(field) in (None, "") for rec in records):
        return None
    return np.array([_num(rec[field], field, f"{where} {name}")
                     for rec, name in zip(records, names, strict=True)])


def _finish(n, d, loss, s, names, n_key, has_s, min_points, se=None, weight=None,
            n_total=None):
    table = ScalingTable(
        N=np.asarray(n, np.float64),
        D=np.asarray(d, np.float64),
        loss=np.asarray(loss, np.float64),
        S=np.asarray(s, np.float64) if has_s else None,
        names=tuple(str(x) for x in names),
        n_key=n_key,
        se=se,
        weight=weight,
        n_total=n_total,
    )
    cols = {"N": table.N, "D": table.D}
    if table.S is not None:
        cols["S"] = table.S
    try:
        check_points(cols, table.loss, min_points)
    except BadPoint as err:  # name the run behind a bad row
        raise ValueError(f"{err} (run {table.names[err.row]})") from None
    return table


def _diverged(rec: dict[str, Any]) -> bool:
    """Status ``diverged``, a true ``diverged`` flag, or a non-finite (``"nan"``) val_loss."""
    if rec.get("status") == "diverged" or rec.get("diverged") is True:
        return True
    lv = rec.get("val_loss", rec.get("final_val_loss"))
    if lv is None or isinstance(lv, bool):
        return False
    try:
        return not math.isfinite(float(lv))
    except (TypeError, ValueError):
        return False  # not a number: _num names the field


def from_sweep_dir(
    path: str | Path,
    *,
    n_key: str | None = None,
    statuses: tuple[str, ...] = ("completed",),
    min_points: int = 5,
) -> ScalingTable:
    """One row per run dir with a ``summary.json``; runs whose status is not in ``statuses``
    are skipped with a warning (pass ``statuses=("completed", "running")`` to keep more), and
    so are diverged runs (``_diverged``), whatever ``statuses`` says: they have no usable loss."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"sweep dir {root} does not exist or is not a directory")
    records, names, skipped, diverged = [], [], [], []
    for sub in sorted(p for p in root.iterdir() if (p / "summary.json").is_file()):
        try:
            rec = json.loads((sub / "summary.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{sub / 'summary.json'} is not valid JSON: {err}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{sub / 'summary.json'} holds a JSON {type(rec).__name__}, not "
                             "an object; restore it or move the run dir aside")
        if _diverged(rec):
            step = rec.get("diverged_step", rec.get("step"))
            diverged.append(f"{sub.name} (step {step}, val_loss {rec.get('val_loss')})")
            continue
        if rec.get("status") not in statuses:
            skipped.append(f"{sub.name} ({rec.get('status')})")
            continue
        records.append(rec)
        names.append(sub.name)
    if diverged:
        warnings.warn(
            f"skipped {len(diverged)} diverged run(s): {', '.join(diverged)}", stacklevel=2
        )
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} run(s) not in {statuses}: {', '.join(skipped)}", stacklevel=2
        )
    if not records:
        raise ValueError(f"{root} holds no run dir with a summary.json of status in {statuses}")
    n, d, loss, s = _rows_from_records(records, names, n_key, "run")
    has_s = any(r.get("sparsity") is not None for r in records)
    return _finish(n, d, loss, s, names, n_key or "n_avg", has_s, min_points,
                   se=_optional(records, names, "val_loss_se", "run"),
                   n_total=_optional(records, names, "n_params", "run"))


def from_columns(columns: dict[str, Any], *, n_key: str | None = None, min_points: int = 5):
    """From a mapping of column name to values (CSV columns or DataFrame columns)."""
    cols = {k: list(v) for k, v in columns.items()}
    length = len(next(iter(cols.values()))) if cols else 0
    name_col = next((c for c in ("name", "run") if c in cols), None)
    names = [str(v) for v in cols[name_col]] if name_col else [str(i) for i in range(length)]
    s_col = "S" if "S" in cols else "sparsity" if "sparsity" in cols else None
    records = [{k: cols[k][i] for k in cols} for i in range(length)]
    se_col = "se" if "se" in cols else "val_loss_se"
    extra = {"se": _optional(records, names, se_col, "row"),
             "weight": _optional(records, names, "weight", "row"),
             "n_total": _optional(records, names, "n_params", "row")}
    if {"N", "D", "loss"} <= set(cols) and n_key is None:
        s = [_num(v, s_col, f"row {i}") for i, v in enumerate(cols[s_col])] if s_col else []
        rows = [[_num(v, c, f"row {i}") for i, v in enumerate(cols[c])] for c in ("N", "D", "loss")]
        return _finish(*rows, s or [0.0] * length, names, "N", s_col is not None, min_points,
                       **extra)
    if not records:
        raise ValueError("the table has no rows")
    n, d, loss, s = _rows_from_records(records, names, n_key, "row")
    return _finish(n, d, loss, s, names, n_key or "n_avg", s_col is not None, min_points,
                   **extra)


CSV_FORM = ("a header row (N,D,loss[,S], or summary keys such as n_avg,tokens,val_loss) and "
            "one row per run")


def from_csv(path: str | Path, *, n_key: str | None = None, min_points: int = 5) -> ScalingTable:
    """From a UTF-8 CSV file (a byte-order mark, as spreadsheet programs write, is skipped):
    ``N, D, loss`` columns or the summary keys (module docstring). ``ValueError`` naming the
    file when it is empty, has a header but no rows, or is not UTF-8 text."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols: dict[str, list] = {k: [] for k in (reader.fieldnames or []) if k}
            for row in reader:
                for k in cols:
                    v = row.get(k)
                    cols[k].append(None if v in (None, "") else v)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 CSV file ({err.reason} at byte {err.start}); "
                         f"it needs {CSV_FORM}") from None
    except csv.Error as err:
        raise ValueError(f"{path} is not a readable CSV file ({err}); it needs {CSV_FORM}"
                         ) from None
    cols = {k: v for k, v in cols.items() if not k.startswith("Unnamed")}
    if not cols:
        raise ValueError(f"{path} is empty (no header row); it needs {CSV_FORM}")
    if not any(cols.values()):
        raise ValueError(f"{path} has a header ({','.join(cols)}) but no rows; add one row per "
                         "run")
    return from_columns(cols, n_key=n_key, min_points=min_points)


def load_table(source, *, n_key: str | None = None, min_points: int = 5, **kwargs) -> ScalingTable:
    """A sweep dir, a ``.csv`` path or a pandas DataFrame -> ``ScalingTable``."""
    if hasattr(source, "columns") and hasattr(source, "to_dict"):  # a pandas DataFrame
        return from_columns(
            {str(c): source[c].tolist() for c in source.columns}, n_key=n_key, min_points=min_points
        )
    path = Path(source)
    if path.is_dir():
        return from_sweep_dir(path, n_key=n_key, min_points=min_points, **kwargs)
    if path.suffix.lower() == ".csv" and path.is_file():
        return from_csv(path, n_key=n_key, min_points=min_points)
    raise ValueError(
        f"source must be a sweep dir, an existing .csv file or a DataFrame; got {source}"
    )
