"""Which parameter count should a sparse scaling law use? Fit the same law with each.

Jin et al. 2025 ("The Journey Matters") argue for the average parameter count over training,
``N_avg``; Frantar et al. 2023 use the final non-zero count; a dense-style law would use the
total count. ``compare_n`` fits one law to a sweep with ``N = n_avg``, ``n_active`` (final
non-zero parameters) and ``n_params`` (total parameters) and reports, for each, the fit
objective, the in-sample RMSE of log loss and the leave-one-out RMSE of log loss (each run
predicted by the law refitted without it), all over the same runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from scaling import logs
from scaling.fit import fit_chinchilla, fit_frantar
from scaling.uncertainty import leave_one_out
from scaling.weights import table_weights

COMPARED = ("n_avg", "n_active", "n_params")
LABELS = {"n_avg": "N_avg", "n_active": "N_final (non-zero)", "n_params": "N_total"}


class NComparison(NamedTuple):
    n_key: str  # summary field used as N
    label: str
    objective: float  # the fit's objective (sum of Huber on log residuals)
    rmse: float  # in-sample RMSE of log loss: sqrt(mean(log(pred / obs)^2))
    loo_rmse: float  # leave-one-out RMSE of log loss
    n_points: int
    reasons: tuple[str, ...]  # why the fit is degenerate (empty: it is not)
    fit: object  # the ChinchillaFit / FrantarFit


def fit_table(table: logs.ScalingTable, law: str, **kwargs):
    """Fit ``law`` ("chinchilla" or "frantar") to a ``ScalingTable``."""
    if law == "chinchilla":
        return fit_chinchilla(table.N, table.D, table.loss, **kwargs)
    if law == "frantar":
        if table.S is None:
            raise ValueError("--law frantar needs a sparsity column (S or sparsity)")
        kwargs = {**kwargs, "grid": "default" if kwargs.get("grid", "epoch") == "epoch"
                  else kwargs["grid"]}
        return fit_frantar(table.S, table.N, table.D, table.loss, **kwargs)
    raise ValueError(f"law must be 'chinchilla' or 'frantar'; got {law!r}")


def in_sample_rmse(fit) -> float:
    """RMSE of ``log(predicted / observed)`` over the fitted points."""
    d = fit.data
    pred = fit.predict(d["S"], d["N"], d["D"]) if "S" in d else fit.predict(d["N"], d["D"])
    return float(np.sqrt(np.mean(np.log(pred / d["loss"]) ** 2)))


def compare_n(
    source,
    *,
    law: str = "chinchilla",
    n_keys: tuple[str, ...] = COMPARED,
    fixed: Mapping[str, float] | None = None,
    **fit_kwargs,
) -> list[NComparison]:
    """Fit ``law`` to ``source`` (a sweep dir, or a CSV/DataFrame with the summary fields) once
    per N in ``n_keys``; one ``NComparison`` per fit, in that order. ``fit_kwargs`` go to the
    fit (``weights="se"``: inverse-variance weights from each run's ``val_loss_se``)."""
    rows = []
    names = None
    for key in n_keys:
        try:
            table = logs.load_table(source, n_key=key)
        except logs.MissingField as err:
            raise ValueError(
                f"comparing N needs the summary fields {', '.join(n_keys)} for every run: {err}"
            ) from None
        if names is not None and table.names != names:
            raise ValueError(f"N = {key} loads different runs than N = {n_keys[0]}")
        names = table.names
        fit = fit_table(table, law, fixed=fixed, **{
            **fit_kwargs, "weights": table_weights(table, fit_kwargs.get("weights"))})
        loo = leave_one_out(fit)
        rows.append(
            NComparison(key, LABELS.get(key, key), float(fit.objective), in_sample_rmse(fit),
                        float(loo.rmse_log), int(fit.n_points), fit.reasons, fit)
        )
    return rows


def format_comparison(rows: list[NComparison]) -> str:
    """The comparison as a text table (best leave-one-out RMSE marked)."""
    best = min(range(len(rows)), key=lambda i: rows[i].loo_rmse)
    lines = [
        f"{'N':<20} {'objective':>12} {'RMSE log L':>11} {'LOO RMSE log L':>15}  flag",
        f"{'-' * 20} {'-' * 12} {'-' * 11} {'-' * 15}  {'-' * 10}",
    ]
    for i, r in enumerate(rows):
        flag = "DEGENERATE" if r.reasons else ("best LOO" if i == best else "")
        lines.append(
            f"{r.label:<20} {r.objective:>12.4e} {r.rmse:>11.4g} {r.loo_rmse:>15.4g}  {flag}"
        )
    return "\n".join(lines)
