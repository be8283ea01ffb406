"""Compute-optimal sparse pre-training plans from an N_avg law (Jin et al. 2025, "The Journey
Matters: Average Parameter Count over Pre-training Unifies Sparse and Dense Scaling Laws").

A run prunes from density 1 to ``1 - s`` inside a window of training (fractions ``start`` to
``end``). Its average parameter count is ``N_avg = N_dense * rho`` with ``rho`` the average
density over steps, and its training compute is density-weighted: ``C = 6 N_avg D``. The law
``L = E + A/N_avg^alpha + B/D^beta`` then has the Chinchilla optimum in ``(N_avg, D)``; the
dense size to build is ``N_avg / rho``.

Average density (continuous time, fraction ``u`` of the window elapsed, ``q = 1 - s``):
- ``geometric`` (the Journey-Matters schedule): density ``q^u``, window mean ``(1 - q) / -ln q``;
- ``linear``: density ``1 - s u``, mean ``1 - s/2``;
- ``cubic`` (Zhu & Gupta 2017): sparsity ``s (1 - (1 - u)^3)``, mean density ``1 - 3 s / 4``.
With ``by="steps"`` the window is placed by fraction of steps:
``rho = start + (end - start) m + (1 - end) q``. With ``by="compute"`` (Journey Matters' "start
at 25%, end at 75%" of compute) the fractions are of cumulative density-weighted compute, and
``rho = 1 / (start + (end - start) / m + (1 - end) / q)`` (each phase's step share is its compute
share divided by its mean density).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from scaling.laws import ChinchillaLaw

KINDS = ("geometric", "linear", "cubic")


def window_mean_density(final_sparsity: float, kind: str = "geometric") -> float:
    """Mean density inside the pruning window (from 1 down to ``1 - final_sparsity``)."""
    if not 0 <= final_sparsity < 1:
        raise ValueError(f"final_sparsity must be in [0, 1); got {final_sparsity}")
    q = 1.0 - final_sparsity
    if kind == "geometric":
        return 1.0 if final_sparsity == 0 else (1.0 - q) / -math.log(q)
    if kind == "linear":
        return 1.0 - final_sparsity / 2.0
    if kind == "cubic":
        return 1.0 - 0.75 * final_sparsity
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


def average_density(
    final_sparsity: float,
    start: float = 0.25,
    end: float = 0.75,
    *,
    kind: str = "geometric",
    by: str = "compute",
) -> float:
    """Average density over training of a dense-to-sparse window schedule (see module doc)."""
    if not 0 <= start <= end <= 1:
        raise ValueError(f"need 0 <= start <= end <= 1; got start={start}, end={end}")
    m = window_mean_density(final_sparsity, kind)
    q = 1.0 - final_sparsity
    if by == "steps":
        return start + (end - start) * m + (1.0 - end) * q
    if by == "compute":
        return 1.0 / (start + (end - start) / m + (1.0 - end) / q)
    raise ValueError(f"by must be 'steps' or 'compute'; got {by!r}")


class SparsePlan(NamedTuple):
    n_dense: float  # parameters of the dense model to build
    n_final: float  # non-zero parameters at the end (n_dense * (1 - s))
    n_avg: float  # average parameter count over training
    tokens: float
    loss: float  # predicted
    average_density: float
    flops: float  # 6 * n_avg * tokens


def plan_sparse(
    law: ChinchillaLaw,
    flops: float,
    final_sparsity: float,
    start: float = 0.25,
    end: float = 0.75,
    *,
    kind: str = "geometric",
    by: str = "compute",
) -> SparsePlan:
    """Dense size, tokens and N_avg minimising an N_avg law's loss for a training budget."""
    if not (np.isfinite(flops) and flops > 0):
        raise ValueError(f"flops must be finite and > 0; got {flops}")
    rho = average_density(final_sparsity, start, end, kind=kind, by=by)
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
