"""Chinchilla Approach 2: iso-FLOP profiles (Hoffmann et al. 2022, section 3.2).

For each training budget C, runs of several model sizes N (with D = C / (6 N)) trace a valley of
final loss; a parabola in ``log N`` fitted to each valley, ``L = c0 + c1 x + c2 x^2``
(``x = log N``), has its minimum at ``N_opt(C) = exp(-c1 / (2 c2))``. Power laws through the
minima, ``N_opt = k_N C^a`` and ``D_opt = C / (6 N_opt) = k_D C^b`` (so ``b = 1 - a``), give
the compute-optimal exponents without assuming a loss law (Hoffmann et al.: a = 0.49).

Runs are grouped into budgets by ``C = 6 N D`` (or a ``flops`` column given), consecutive
budgets (sorted) within a relative ``rtol`` of each other forming one group; a group needs
>= 3 distinct N and an upward parabola (``c2 > 0``). ``weights`` weigh the parabola fits (the
squared residuals; e.g. ``1 / SE^2``). A minimum outside the group's range of N is an
extrapolation and is marked.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["IsoFlopBudget", "IsoFlopFit", "fit_isoflop", "group_budgets"]


class IsoFlopBudget(NamedTuple):
    flops: float  # the group's budget (geometric mean of its runs' C)
    n_opt: float  # the parabola's minimum
    d_opt: float  # flops / (6 n_opt)
    loss_opt: float  # the parabola's value there
    coef: tuple[float, float, float]  # (c0, c1, c2) of L = c0 + c1 log N + c2 log^2 N
    n_points: int
    inside: bool  # n_opt within the group's range of N (else extrapolated)


class IsoFlopFit(NamedTuple):
    budgets: tuple[IsoFlopBudget, ...]
    a: float  # N_opt ~ C^a
    b: float  # D_opt ~ C^b
    log_k_n: float  # N_opt = exp(log_k_n) C^a
    log_k_d: float  # D_opt = exp(log_k_d) C^b

    def n_opt(self, flops) -> np.ndarray:
        return np.exp(self.log_k_n) * np.asarray(flops, np.float64) ** self.a

    def d_opt(self, flops) -> np.ndarray:
        return np.exp(self.log_k_d) * np.asarray(flops, np.float64) ** self.b


def group_budgets(flops: np.ndarray, rtol: float = 0.05) -> np.ndarray:
    """Group label per run: sorted budgets within ``rtol`` (relative) of the previous one
    share a group."""
    flops = np.asarray(flops, np.float64)
    order = np.argsort(flops)
    labels = np.empty(flops.shape[0], np.int64)
    group, prev = 0, None
    for i in order:
        if prev is not None and flops[i] > prev * (1 + rtol):
            group += 1
        labels[i], prev = group, flops[i]
    return labels


def fit_isoflop(N, D, loss, *, flops=None, rtol: float = 0.05, weights=None) -> IsoFlopFit:
    """Approach 2 of Hoffmann et al. 2022 (module docstring). ``flops`` defaults to 6 N D."""
    N, D, loss = (np.asarray(x, np.float64).ravel() for x in (N, D, loss))
    for name, x in (("N", N), ("D", D), ("loss", loss)):
        if x.shape != N.shape or not np.all(np.isfinite(x) & (x > 0)):
            raise ValueError(f"{name} must be finite, > 0 and of one length with N")
    c = 6.0 * N * D if flops is None else np.asarray(flops, np.float64).ravel()
    if c.shape != N.shape or not np.all(np.isfinite(c) & (c > 0)):
        raise ValueError("flops must be finite, > 0 and one per run")
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0; got {rtol}")
    w = np.ones_like(N) if weights is None else np.asarray(weights, np.float64).ravel()
    if w.shape != N.shape or not np.all(np.isfinite(w) & (w >= 0)):
        raise ValueError("weights must be finite, >= 0 and one per run")
    labels = group_budgets(c, rtol)
    budgets = []
    for g in np.unique(labels):
        m = labels == g
        x = np.log(N[m])
        cg = float(np.exp(np.mean(np.log(c[m]))))
        if np.unique(x).size < 3:
            raise ValueError(f"the budget C = {cg:.4g} has {np.unique(x).size} distinct N; "
                             "a parabola needs >= 3 (or adjust rtol)")
        c2, c1, c0 = np.polyfit(x, loss[m], 2, w=np.sqrt(w[m]))
        if not c2 > 0:
            raise ValueError(f"the loss at budget C = {cg:.4g} does not curve upward in log N "
                             f"(c2 = {c2:.3g}): no minimum; widen the range of N")
        xs = -c1 / (2 * c2)
        budgets.append(IsoFlopBudget(cg, float(np.exp(xs)), float(cg / (6 * np.exp(xs))),
                                     float(c0 + c1 * xs + c2 * xs**2), (c0, c1, c2),
                                     int(m.sum()), bool(x.min() <= xs <= x.max())))
    if len(budgets) < 2:
        raise ValueError(f"Approach 2 needs >= 2 budgets; got {len(budgets)}")
    lc = np.log([b.flops for b in budgets])
    a, log_k_n = np.polyfit(lc, np.log([b.n_opt for b in budgets]), 1)
    b, log_k_d = np.polyfit(lc, np.log([b.d_opt for b in budgets]), 1)
    return IsoFlopFit(tuple(budgets), float(a), float(b), float(log_k_n), float(log_k_d))
