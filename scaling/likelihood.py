"""Huber likelihood with a free scale: the objective of Besiroglu et al. 2024's headline fit.

Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (Epoch AI; notebook
``data_analysis.ipynb`` of epoch-research/analyzing-chinchilla) estimate the Chinchilla law by
maximum likelihood, with the log residuals ``r_i = log L_i - log pred_i`` distributed as a
Huber density of scale ``sigma``:

    p(r) = exp(-H_delta(r / sigma)) / (Z(delta) sigma),
    Z(delta) = sqrt(2 pi) (1 - 2 Phi(-delta)) + 2 exp(-delta^2 / 2) / delta,

so the negative log-likelihood is ``sum_i w_i [H_delta(r_i / sigma) + log sigma + log Z]``
(``w`` per-point weights, 1 by default; delta = 1e-3). As ``H_delta(r / sigma) =
H_{delta sigma}(r) / sigma^2``, at a fixed sigma the fit of the law is the summed Huber fit with
``delta sigma`` in place of delta; at fixed parameters sigma solves the 1-D score equation
``sum_i w_i psi(x_i) x_i = sum_i w_i`` (``x = r / sigma``, ``psi = clip(., -delta, delta)``),
whose left side falls monotonically in sigma. ``scaling.fit`` alternates the two (block
coordinate descent; each block is minimised exactly, so the negative log-likelihood never
rises). On the Chinchilla data sigma settles near 5e-6, i.e. an effective Huber delta of
~5e-9: the likelihood fit is almost a least-absolute-deviation fit, which is why it differs from
the summed Huber(1e-3) fit (A = 482 vs 478, B = 2085 vs 2143).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special

__all__ = ["log_normalizer", "negative_log_likelihood", "best_sigma"]


def log_normalizer(delta: float) -> float:
    """``log Z(delta)`` of the unit-scale Huber density (module docstring)."""
    if not delta > 0:
        raise ValueError(f"huber_delta must be > 0; got {delta}")
    z = math.sqrt(2 * math.pi) * (1 - 2 * special.ndtr(-delta)) + 2 * math.exp(
        -0.5 * delta**2) / delta
    return math.log(z)


def _huber(x: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(x)
    return np.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def negative_log_likelihood(r, sigma: float, delta: float = 1e-3, weights=None) -> float:
    """``sum_i w_i [H_delta(r_i / sigma) + log sigma + log Z(delta)]``."""
    r = np.asarray(r, np.float64)
    w = np.ones_like(r) if weights is None else np.asarray(weights, np.float64)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    return float(np.sum(w * (_huber(r / sigma, delta) + math.log(sigma)
                             + log_normalizer(delta))))


def best_sigma(r, delta: float = 1e-3, weights=None) -> float:
    """The scale maximising the likelihood of residuals ``r`` (the root of the score equation;
    module docstring). Needs a residual that is not zero."""
    r = np.asarray(r, np.float64)
    w = np.ones_like(r) if weights is None else np.asarray(weights, np.float64)
    a = np.abs(r[w > 0])
    if not np.any(a > 0):
        raise ValueError("the scale of all-zero residuals is not defined")
    total = w.sum()

    def score(log_s: float) -> float:  # sum w psi(x) x - sum w, falling in sigma
        x = np.abs(r) / math.exp(log_s)
        return float(np.sum(w * np.where(x <= delta, x * x, delta * x)) - total)

    # bracket: at sigma = e max|r| / min(delta, 1) every x < min(delta, 1), so the score is
    # sum w x^2 - sum w < 0; at the lower end delta * sum w |r| / sigma >= total
    hi = math.log(a.max() / min(delta, 1.0)) + 1.0
    lo = math.log(delta * float(np.sum(w * np.abs(r))) / total) - 1.0
    while score(lo) <= 0:  # small residuals count x^2 < delta x: widen until the sign holds
        lo -= 5.0
    return math.exp(optimize.brentq(score, lo, hi, xtol=1e-13, rtol=1e-14))
