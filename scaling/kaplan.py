"""Kaplan et al. 2020's joint law, "Scaling Laws for Neural Language Models", eq. (1.5):

    L(N, D) = [ (N_c / N)^(alpha_N / alpha_D) + D_c / D ]^alpha_D

(their fit: alpha_N = 0.076, alpha_D = 0.095, N_c = 8.8e13 non-embedding parameters,
D_c = 5.4e13 tokens; no irreducible term). In log space it is
``log L = alpha_D * LSE(q (log N_c - log N), log D_c - log D)`` with ``q = alpha_N / alpha_D``,
fitted like the other laws: the sum of Huber(delta) losses on log residuals from a grid of
starts (``scaling.robust``), over ``(log N_c, log D_c, alpha_N, alpha_D)`` with the exponents
in (0, 2]. Kaplan et al. count N without the embedding matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scaling.robust import multistart

__all__ = ["KaplanFit", "KaplanLaw", "fit_kaplan"]


@dataclass(frozen=True)
class KaplanLaw:
    """``L(N, D) = ((N_c / N)^(alpha_N / alpha_D) + D_c / D)^alpha_D``."""

    alpha_N: float
    alpha_D: float
    N_c: float
    D_c: float

    def __post_init__(self):
        for k in ("alpha_N", "alpha_D", "N_c", "D_c"):
            v = getattr(self, k)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{k} must be finite and > 0; got {v}")

    def log_predict(self, N, D) -> np.ndarray:
        x, y = np.log(np.asarray(N, np.float64)), np.log(np.asarray(D, np.float64))
        q = self.alpha_N / self.alpha_D
        return self.alpha_D * np.logaddexp(q * (np.log(self.N_c) - x), np.log(self.D_c) - y)

    def predict(self, N, D) -> np.ndarray:
        N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
        if not (np.all(N > 0) and np.all(D > 0)):
            raise ValueError("N and D must be > 0")
        return np.exp(self.log_predict(N, D))


@dataclass(frozen=True)
class KaplanFit:
    law: KaplanLaw
    objective: float  # sum of Huber(huber_delta) on log residuals
    huber_delta: float
    n_points: int
    n_starts: int
    n_at_best: int

    def predict(self, N, D) -> np.ndarray:
        return self.law.predict(N, D)


_GRID = {
    "log_nc": (15.0, 35.0),
    "log_dc": (15.0, 35.0),
    "alpha_N": (0.05, 0.3),
    "alpha_D": (0.05, 0.3),
}


def fit_kaplan(N, D, loss, *, huber_delta: float = 1e-3, grid=None) -> KaplanFit:
    """Fit Kaplan et al.'s L(N, D) (module docstring). ``grid``: a dict of start values over
    ``log_nc, log_dc, alpha_N, alpha_D`` (natural logs of N_c, D_c)."""
    N, D, loss = (np.asarray(v, np.float64).ravel() for v in (N, D, loss))
    for name, v in (("N", N), ("D", D), ("loss", loss)):
        if v.shape != N.shape or not np.all(np.isfinite(v) & (v > 0)):
            raise ValueError(f"{name} must be finite, > 0 and one per run")
    if N.shape[0] < 4:
        raise ValueError(f"{N.shape[0]} points but 4 free parameters; need >= 4")
    x, y, t = np.log(N), np.log(D), np.log(loss)
    g = {**_GRID, **(grid or {})}
    starts = np.array(np.meshgrid(*(g[k] for k in _GRID), indexing="ij")).reshape(4, -1).T

    def residuals(p):
        q = p[2] / p[3]
        return p[3] * np.logaddexp(q * (p[0] - x), p[1] - y) - t

    def jac(p):  # d r / d (log N_c, log D_c, alpha_N, alpha_D)
        q, dn = p[2] / p[3], p[0] - x
        u1, u2 = q * dn, p[1] - y
        lse = np.logaddexp(u1, u2)
        s1 = np.exp(u1 - lse)
        return np.stack([p[2] * s1, p[3] * (1 - s1), s1 * dn, lse - s1 * q * dn], axis=1)

    lower = np.array([-50.0, -50.0, 1e-6, 1e-6])
    upper = np.array([200.0, 200.0, 2.0, 2.0])
    theta, obj, at_best = multistart(residuals, starts, huber_delta, lower, upper, jac)
    law = KaplanLaw(alpha_N=float(theta[2]), alpha_D=float(theta[3]),
                    N_c=float(np.exp(theta[0])), D_c=float(np.exp(theta[1])))
    return KaplanFit(law, obj, float(huber_delta), int(N.shape[0]), int(starts.shape[0]), at_best)
