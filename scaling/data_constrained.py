"""The data-constrained scaling law of Muennighoff et al. 2023, "Scaling Data-Constrained
Language Models" (eqs. 5-7): repeated data and excess parameters decay in value.

With ``U_D`` unique tokens seen ``D / U_D`` times, the effective data and parameters are

    D' = U_D + U_D R*_D (1 - exp(-R_D / R*_D)),   R_D = D / U_D - 1   (repeated epochs),
    N' = U_N + U_N R*_N (1 - exp(-R_N / R*_N)),   R_N = N / U_N - 1,
    U_N = min(N_opt(U_D), N),

``N_opt(U_D)`` the compute-optimal size for ``U_D`` tokens under the base law
``L = E + A/N^alpha + B/D^beta`` (``D_opt(C) = U_D`` solved for C; ``scaling.laws``), and the
loss is the base law at ``(N', D')``. A run with ``D <= U_D`` (one epoch or less) sees
``D' = D``. Their fit: ``R*_D = 15.4``, ``R*_N = 5.3`` (base E = 1.87, A = 521, B = 1488,
alpha = beta = 0.353).

Fitting follows the paper: the base law from the single-epoch runs (``fit_chinchilla``; or
given), then ``R*_D, R*_N`` by the sum of Huber(delta) on log residuals over all runs, from a
grid of starts (``scaling.robust``). A single-epoch run larger than ``N_opt(D)`` already feels
``R*_N``, so a base fitted here is then refined jointly with ``R*_D, R*_N`` over all runs (a
given base stays fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scaling.fit import fit_chinchilla
from scaling.laws import ChinchillaLaw
from scaling.robust import multistart

__all__ = ["DataConstrainedFit", "DataConstrainedLaw", "fit_data_constrained"]


def _effective(units: np.ndarray, total: np.ndarray, r_star: float) -> np.ndarray:
    """``U + U R* (1 - exp(-R / R*))`` with ``R = total / U - 1`` (>= 0)."""
    r = np.maximum(total / units - 1.0, 0.0)
    return units + units * r_star * -np.expm1(-r / r_star)


@dataclass(frozen=True)
class DataConstrainedLaw:
    """The base Chinchilla law at the effective ``(N', D')`` (module docstring)."""

    base: ChinchillaLaw
    R_D: float  # R*_D: repetitions after which repeated data's value has decayed by 1/e
    R_N: float  # R*_N: the same for excess parameters

    def __post_init__(self):
        for k in ("R_D", "R_N"):
            v = getattr(self, k)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{k} must be finite and > 0; got {v}")

    def n_opt_for(self, unique) -> np.ndarray:
        """The compute-optimal N whose optimal D is ``unique`` tokens (U_N's cap)."""
        law = self.base
        a, b = law.exponents
        g = (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / (law.alpha + law.beta))
        c6 = (g * np.asarray(unique, np.float64)) ** (1.0 / b)  # C / 6 with D_opt(C) = U_D
        return g * c6**a

    def effective(self, N, D, unique) -> tuple[np.ndarray, np.ndarray]:
        """``(N', D')`` of runs of N parameters on D tokens drawn from ``unique`` tokens."""
        N, D, U = (np.asarray(v, np.float64) for v in (N, D, unique))
        if not (np.all(N > 0) and np.all(D > 0) and np.all(U > 0)):
            raise ValueError("N, D and unique must be > 0")
        u_d = np.minimum(U, D)
        u_n = np.minimum(self.n_opt_for(u_d), N)
        return _effective(u_n, N, self.R_N), _effective(u_d, D, self.R_D)

    def predict(self, N, D, unique) -> np.ndarray:
        n_eff, d_eff = self.effective(N, D, unique)
        return self.base.predict(n_eff, d_eff)


@dataclass(frozen=True)
class DataConstrainedFit:
    law: DataConstrainedLaw
    base_fit: object | None  # the ChinchillaFit of the single-epoch runs (None: base given)
    objective: float  # sum of Huber(huber_delta) on log residuals over all runs
    huber_delta: float
    n_points: int
    n_at_best: int

    def predict(self, N, D, unique) -> np.ndarray:
        return self.law.predict(N, D, unique)


def fit_data_constrained(
    N,
    D,
    unique,
    loss,
    *,
    base: ChinchillaLaw | None = None,
    huber_delta: float = 1e-3,
    base_grid="epoch",
) -> DataConstrainedFit:
    """Fit Muennighoff et al.'s law (module docstring). ``unique``: each run's unique tokens
    (``D / unique`` epochs). Without ``base`` the Chinchilla law is fitted to the runs with
    ``D <= unique`` first (it needs >= 5 of them, with >= 3 distinct N and D)."""
    N, D, U, loss = (np.asarray(v, np.float64).ravel() for v in (N, D, unique, loss))
    for name, v in (("N", N), ("D", D), ("unique", U), ("loss", loss)):
        if v.shape != N.shape or not np.all(np.isfinite(v) & (v > 0)):
            raise ValueError(f"{name} must be finite, > 0 and one per run")
    base_fit = None
    if base is None:
        one = D <= U * (1 + 1e-9)
        if one.sum() < 5:
            raise ValueError(f"{int(one.sum())} single-epoch runs (D <= unique); the base law "
                             "needs >= 5, or pass base=")
        base_fit = fit_chinchilla(N[one], D[one], loss[one], huber_delta=huber_delta,
                                  grid=base_grid)
        base = base_fit.law
    if not np.any(D > U * (1 + 1e-9)):
        raise ValueError("no run repeats data (D > unique): R*_D and R*_N are not measured")
    t = np.log(loss)

    def residuals(p):
        law = DataConstrainedLaw(base, float(np.exp(p[0])), float(np.exp(p[1])))
        return np.log(law.predict(N, D, U)) - t

    starts = np.log(np.array([[a, b] for a in (2.0, 10.0, 50.0) for b in (2.0, 10.0, 50.0)]))
    lower, upper = np.log([1e-3, 1e-3]), np.log([1e6, 1e6])
    theta, obj, at_best = multistart(residuals, starts, huber_delta, lower, upper)
    law = DataConstrainedLaw(base, float(np.exp(theta[0])), float(np.exp(theta[1])))
    if base_fit is not None:  # joint refinement: single-epoch runs with N > N_opt(D) also
        # feel R*_N, so the base fitted on them alone is biased
        def joint(p):
            return np.log(_law(p).predict(N, D, U)) - t

        p0 = np.array([np.log(base.E), np.log(base.A), np.log(base.B), base.alpha, base.beta,
                       theta[0], theta[1]])
        lo = np.array([np.log(base_fit.bounds[k][0]) for k in ("E", "A", "B")] + [1e-6, 1e-6]
                      + list(lower))
        hi = np.array([np.log(base_fit.bounds[k][1]) for k in ("E", "A", "B")] + [2.0, 2.0]
                      + list(upper))
        p, obj, at_best = multistart(joint, p0[None], huber_delta, lo, hi)
        law = _law(p)
    return DataConstrainedFit(law, base_fit, obj, float(huber_delta), int(N.shape[0]), at_best)


def _law(p: np.ndarray) -> DataConstrainedLaw:
    base = ChinchillaLaw(E=float(np.exp(p[0])), A=float(np.exp(p[1])), B=float(np.exp(p[2])),
                         alpha=float(p[3]), beta=float(p[4]))
    return DataConstrainedLaw(base, float(np.exp(p[5])), float(np.exp(p[6])))
