"""Multi-start robust least squares for laws that are not log-sum-exp-linear (Kaplan et al.
2020's L(N, D), the data-constrained law of Muennighoff et al. 2023).

The objective is the one of ``scaling.fit``: the sum of Huber(delta) losses on the log
residuals. ``scipy.optimize.least_squares(loss="huber", f_scale=delta)`` minimises
``sum delta^2 rho(r^2 / delta^2)`` with ``rho(z) = z`` for ``z <= 1`` and ``2 sqrt(z) - 1``
beyond, which is exactly ``2 sum Huber_delta(r)``; it is run from every start of a grid and the
best optimum kept.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import optimize

__all__ = ["huber_sum", "multistart"]


def huber_sum(r: np.ndarray, delta: float) -> float:
    """``sum_i Huber_delta(r_i)``."""
    a = np.abs(r)
    return float(np.sum(np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))))


def multistart(residuals: Callable[[np.ndarray], np.ndarray], starts: np.ndarray,
               delta: float, lower: np.ndarray, upper: np.ndarray,
               jac: Callable[[np.ndarray], np.ndarray] | str = "2-point",
               ) -> tuple[np.ndarray, float, int]:
    """The best (theta, sum of Huber, number of starts that reached it within 1e-6 relative)
    over ``starts`` (S, P), each refined by a bounded trust-region least squares (``jac``: the
    residuals' (n, P) Jacobian, or finite differences)."""
    if not delta > 0:
        raise ValueError(f"huber_delta must be > 0; got {delta}")
    best, thetas, objs = None, [], []
    for x0 in np.atleast_2d(starts):
        x0 = np.clip(x0, lower + 1e-12, upper - 1e-12)
        try:
            res = optimize.least_squares(residuals, x0, jac=jac, loss="huber", f_scale=delta,
                                         bounds=(lower, upper), method="trf", x_scale="jac",
                                         ftol=1e-12, xtol=1e-12, gtol=1e-12, max_nfev=500)
        except (ValueError, FloatingPointError):
            continue
        r = residuals(res.x)
        if not np.all(np.isfinite(r)):
            continue
        thetas.append(res.x)
        objs.append(huber_sum(r, delta))
    if not objs:
        raise ValueError("no start of the grid gave a finite fit")
    objs = np.array(objs)
    i = int(np.argmin(objs))
    best = objs[i]
    return thetas[i], float(best), int(np.sum(objs <= best * (1 + 1e-6) + 1e-300))
