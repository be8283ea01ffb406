"""Per-point weights for scaling-law fits.

The fits penalise log residuals, so a point's noise is that of its log loss: a validation loss
``L`` with standard error ``SE`` (``val_loss_se`` in a run's summary.json: the per-window
standard deviation over sqrt(windows)) has ``Var(log L) ~= (SE / L)^2`` (delta method). The
inverse-variance weight ``(L / SE)^2`` gives each point the weight of a Gaussian likelihood's
``1 / sigma_i^2``; weights are scaled to mean 1 so the objective keeps its usual size (and the
Huber delta its meaning for a typical point).
"""

from __future__ import annotations

import numpy as np

__all__ = ["inverse_variance", "normalized", "table_weights"]


def normalized(weights) -> np.ndarray:
    """``weights`` scaled to mean 1 (finite, >= 0, not all zero; else ValueError)."""
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise ValueError("weights must be a 1-D array, finite and >= 0, with one > 0")
    return w / w.mean()


def inverse_variance(loss, se) -> np.ndarray:
    """``(L / SE)^2`` scaled to mean 1: inverse variances of the log losses."""
    loss, se = np.asarray(loss, np.float64), np.asarray(se, np.float64)
    if loss.shape != se.shape:
        raise ValueError(f"se must have the shape of loss {loss.shape}; got {se.shape}")
    if not np.all(np.isfinite(se) & (se > 0)):
        i = int(np.flatnonzero(~(np.isfinite(se) & (se > 0)))[0])
        raise ValueError(f"se (val_loss_se) must be finite and > 0; got {se[i]} at row {i}")
    return normalized((loss / se) ** 2)


def table_weights(table, weights) -> np.ndarray | None:
    """Per-row weights: None, ``"se"`` (inverse variance of the log loss from the table's
    standard errors; ``scaling.weights``), ``"column"`` (a CSV's ``weight`` column) or an
    (n,) array."""
    if weights is None:
        return None
    if isinstance(weights, str):
        if weights == "se":
            if table.se is None:
                raise ValueError("weights 'se' need a standard error for every run "
                                 "(val_loss_se in summary.json, or an se column)")
            return inverse_variance(table.loss, table.se)
        if weights == "column":
            if table.weight is None:
                raise ValueError("weights 'column' need a weight column in the CSV")
            return normalized(table.weight)
        raise ValueError(f"weights must be 'se', 'column' or an array; got {weights!r}")
    return np.asarray(weights, np.float64)
