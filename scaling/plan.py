"""Compute-optimal sparse pre-training plans from an N_avg law (Jin et al. 2025, "The Journey
Matters: Average Parameter Count over Pre-training Unifies Sparse and Dense Scaling Laws").

A run prunes from density 1 to ``1 - s`` inside a window of training (fractions ``start`` to
``end``). Its average parameter count is ``N_avg = N_dense * rho`` with ``rho`` the average
density over steps, and its training compute is density-weighted: ``C = 6 N_avg D``. The law
``L = E + A/N_avg^alpha + B/D^beta`` then has the Chinchilla optimum in ``(N_avg, D)``; the
dense size to build is ``N_avg / rho``.

Average density (continuous time, fraction ``u`` of the window elapsed, ``q = 1 - s``):
- ``geometric`` (the Journey-Matters schedule): density ``q^u``, window mean ``(1 - q) / -ln q``;
- ``polynomial`` (Zhu & Gupta 2017): sparsity ``s (1 - (1 - u)^p)``, mean density
  ``1 - s p / (p + 1)`` (``power=3``, the default, is the cubic schedule; ``power=1`` linear).
The kind names are those of ``sparsejax.schedules``.
With ``by="steps"`` the window is placed by fraction of steps:
``rho = start + (end - start) m + (1 - end) q``. With ``by="compute"`` (Journey Matters' "start
at 25%, end at 75%" of compute) the fractions are of cumulative density-weighted compute, and
``rho = 1 / (start + (end - start) / m + (1 - end) / q)`` (each phase's step share is its compute
share divided by its mean density).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from scaling.laws import ChinchillaLaw
from sparsejax.schedules import WINDOW_KINDS, window_mean_density
from sparsejax.schedules import window_average_density as average_density

__all__ = [
    "KINDS",
    "DegenerateLawError",
    "SparsePlan",
    "average_density",
    "plan_sparse",
    "window_mean_density",
]

KINDS = WINDOW_KINDS


class SparsePlan(NamedTuple):
    n_dense: float  # parameters of the dense model to build
    n_final: float  # non-zero parameters at the end (n_dense * (1 - s))
    n_avg: float  # average parameter count over training
    tokens: float
    loss: float  # predicted
    average_density: float
    flops: float  # 6 * n_avg * tokens


class DegenerateLawError(ValueError):
    """A plan was asked of a law whose fit is degenerate (``scaling.identify``)."""


def plan_sparse(
    law: ChinchillaLaw,
    flops: float,
    final_sparsity: float,
    start: float = 0.25,
    end: float = 0.75,
    *,
    kind: str = "geometric",
    by: str = "compute",
    power: float = 3.0,
    force: bool = False,
) -> SparsePlan:
    """Dense size, tokens and N_avg minimising an N_avg law's loss for a training budget.

    ``law`` is a ``ChinchillaLaw`` or a ``ChinchillaFit`` (its ``.law``). A degenerate law
    (``law.reasons``) raises ``DegenerateLawError`` naming the reasons unless ``force=True``.
    """
    law = getattr(law, "law", law)
    if law.degenerate and not force:
        raise DegenerateLawError(
            "refusing to plan from a degenerate law (pass force=True to plan anyway): "
            + "; ".join(law.reasons)
        )
    if not (np.isfinite(flops) and flops > 0):
        raise ValueError(f"flops must be finite and > 0; got {flops}")
    rho = average_density(final_sparsity, start, end, kind=kind, by=by, power=power)
    opt = law.compute_optimal(flops)
    n_avg, tokens = float(opt.N), float(opt.D)
    n_dense = n_avg / rho
    return SparsePlan(
        n_dense=n_dense,
        n_final=n_dense * (1.0 - final_sparsity),
        n_avg=n_avg,
        tokens=tokens,
        loss=float(opt.loss),
        average_density=rho,
        flops=float(flops),
    )
