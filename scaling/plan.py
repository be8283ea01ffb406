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
The kind names are those of ``sparsejax.schedules``, whose ``window_average_density`` is the
same closed form (``scaling`` imports nothing of ``sparsejax``, so it keeps its own copy; a test
holds the two equal).
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

__all__ = [
    "KINDS",
    "DegenerateLawError",
    "SparsePlan",
    "average_density",
    "plan_sparse",
    "window_mean_density",
]

KINDS = ("geometric", "polynomial")


def window_mean_density(final_sparsity: float, kind: str = "geometric", *,
                        power: float = 3.0) -> float:
    """Mean density inside a pruning window from density 1 down to ``q = 1 - final_sparsity``
    (module docstring): ``(1 - q) / -ln q`` geometric, ``1 - s p / (p + 1)`` polynomial.

    >>> round(window_mean_density(0.5, "polynomial"), 6)
    0.625
    """
    s = float(final_sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"final_sparsity must be in [0, 1), got {final_sparsity!r}")
    if kind == "geometric":
        return 1.0 if s == 0 else s / -math.log1p(-s)
    if kind == "polynomial":
        if not (isinstance(power, int | float) and power > 0):
            raise ValueError(f"power must be > 0, got {power!r}")
        return 1.0 - s * power / (power + 1.0)
    hint = {"cubic": " (the cubic schedule is kind='polynomial', power=3)",
            "linear": " (linear is kind='polynomial', power=1)"}.get(kind, "")
    raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}{hint}")


def average_density(
    final_sparsity: float,
    start: float = 0.25,
    end: float = 0.75,
    *,
    kind: str = "geometric",
    by: str = "compute",
    power: float = 3.0,
) -> float:
    """Average density over training of a dense-to-sparse window schedule, continuous limit:
    ``rho`` of the module docstring, by fraction of ``"steps"`` or of ``"compute"``.

    >>> round(average_density(0.5, by="steps"), 6)
    0.735674
    """
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{name} must be a float in [0, 1], got {v!r}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
    m = window_mean_density(final_sparsity, kind, power=power)
    q = 1.0 - float(final_sparsity)
    if by == "steps":
        return start + (end - start) * m + (1.0 - end) * q
    if by == "compute":
        return 1.0 / (start + (end - start) / m + (1.0 - end) / q)
    raise ValueError(f"by must be one of ['compute', 'steps'], got {by!r}")


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
