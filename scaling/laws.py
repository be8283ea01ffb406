"""Scaling-law objects: predictions and compute-optimal allocations.

- ``ChinchillaLaw``: ``L = E + A/N^alpha + B/D^beta`` (Hoffmann et al. 2022). With
  ``C = 6 N D`` the loss-minimising split of a budget is (their eq. 4)
  ``N_opt = G (C/6)^a``, ``D_opt = G^-1 (C/6)^b``, ``a = beta/(alpha+beta)``,
  ``b = alpha/(alpha+beta)``, ``G = (alpha A / (beta B))^(1/(alpha+beta))``.
  For sparse runs N is the average parameter count N_avg (Jin et al. 2025), and then
  ``C = 6 N_avg D`` is the density-weighted training compute.
- ``FrantarLaw``: ``L = (a (1-S)^b + c) N^-d + e D^-f + g`` (Frantar et al. 2023), N the
  non-zero parameter count; at a fixed sparsity it is a Chinchilla law (``at_sparsity``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class ComputeOptimal(NamedTuple):
    N: np.ndarray  # parameters (N_avg for the sparse form)
    D: np.ndarray  # tokens
    loss: np.ndarray


def _positive(name: str, value) -> np.ndarray:
    arr = np.asarray(value, np.float64)
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(f"{name} must be finite and > 0; got {value}")
    return arr


@dataclass(frozen=True)
class ChinchillaLaw:
    """``L(N, D) = E + A/N^alpha + B/D^beta``.

    ``reasons``: why the fit it came from is degenerate (``scaling.identify``; empty for a sound
    fit or a law written by hand); planners refuse a degenerate law unless forced."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    reasons: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def degenerate(self) -> bool:
        return bool(self.reasons)

    def __post_init__(self):
        for k in ("E", "A", "B", "alpha", "beta"):
            v = getattr(self, k)
            coefficient = k in ("E", "A", "B")
            if not np.isfinite(v) or (coefficient and v < 0):
                raise ValueError(f"{k} must be finite{' and >= 0' if coefficient else ''}; got {v}")

    def predict(self, N, D) -> np.ndarray:
        N, D = _positive("N", N), _positive("D", D)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def exponents(self) -> tuple[float, float]:
        """``(a, b)``: N_opt grows as C^a and D_opt as C^b."""
        s = self._sum()
        return self.beta / s, self.alpha / s

    def _sum(self) -> float:
        if not (self.alpha > 0 and self.beta > 0 and self.A > 0 and self.B > 0):
            raise ValueError(
                f"a compute-optimal split needs A, B, alpha, beta > 0; got A={self.A}, "
                f"B={self.B}, alpha={self.alpha}, beta={self.beta}"
            )
        return self.alpha + self.beta

    def compute_optimal(self, flops) -> ComputeOptimal:
        """Loss-minimising ``N, D`` for a budget ``C = 6 N D`` (closed form, Hoffmann eq. 4)."""
        c = _positive("flops", flops)
        s = self._sum()
        a, b = self.exponents
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        n_opt = g * (c / 6.0) ** a
        d_opt = (c / 6.0) ** b / g
        return ComputeOptimal(n_opt, d_opt, self.predict(n_opt, d_opt))

    def isoflop(self, flops, N) -> np.ndarray:
        """Loss along an iso-FLOP line: ``D = C / (6 N)``."""
        c, n = _positive("flops", flops), _positive("N", N)
        return self.predict(n, c / (6.0 * n))


@dataclass(frozen=True)
class FrantarLaw:
    """``L(S, N, D) = (a (1-S)^b + c) N^-d + e D^-f + g`` (N = non-zero parameters).

    ``reasons`` as in ``ChinchillaLaw`` (carried to ``at_sparsity``)."""

    a: float
    b: float
    c: float
    d: float
    e: float
    f: float
    g: float
    reasons: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def degenerate(self) -> bool:
        return bool(self.reasons)

    def predict(self, S, N, D) -> np.ndarray:
        s = np.asarray(S, np.float64)
        if not np.all((s >= 0) & (s < 1)):
            raise ValueError(f"S must be in [0, 1); got {S}")
        N, D = _positive("N", N), _positive("D", D)
        return (
            (self.a * (1 - s) ** self.b + self.c) * N ** (-self.d)
            + self.e * D ** (-self.f)
            + self.g
        )

    def at_sparsity(self, S: float) -> ChinchillaLaw:
        """The Chinchilla law in (non-zero N, D) at a fixed sparsity ``S``."""
        if not 0 <= S < 1:
            raise ValueError(f"S must be in [0, 1); got {S}")
        return ChinchillaLaw(
            E=self.g,
            A=self.a * (1 - S) ** self.b + self.c,
            B=self.e,
            alpha=self.d,
            beta=self.f,
            reasons=self.reasons,
        )

    def compute_optimal(self, flops, S: float) -> ComputeOptimal:
        """Loss-minimising non-zero N and D at sparsity ``S`` for ``C = 6 N D``."""
        return self.at_sparsity(S).compute_optimal(flops)
