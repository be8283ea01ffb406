"""Batched robust fits of log-sum-exp-linear models: a damped Newton (Levenberg-Marquardt) loop
run on thousands of starts at once, in float64 (a numpy loop around compiled numba passes).

Model. For data point i the predicted log-loss is ``LSE_k(u_ik)``, ``u_ik = M_ik . theta + c_ik``
(every term linear in the parameters). Hoffmann et al. 2022's law
``L = E + A/N^alpha + B/D^beta`` in the parameterisation of Besiroglu et al. 2024 is
``log L = LSE(a - alpha log N, b - beta log D, e)``; the sparse law of Frantar et al. 2023 is a
four-term one. The penalty is ``sum_i w_i kappa(r_i) Huber_delta(r_i)`` with ``r = pred - obs``
in log space (or ``exp(pred) - loss`` in linear space) and ``kappa`` the asymmetry weight.

Method. Each iteration solves ``(H + lambda |diag H|) step = -g`` for every live start
(batched 5x5 / 7x7 systems), evaluates the objective at the trial points (one pass over the
data; derivatives are formed from the same pass only where the step is accepted), keeps a step
only if it lowers the objective, and adapts ``lambda`` per start (/10 on success, x10 on
failure). ``H`` is the iteratively-reweighted Gauss-Newton matrix (Huber weights
``min(1, delta/|r|)``: a majoriser, robust far from the optimum) until ``lambda`` falls to
``exact_below``, then the exact Hessian (fast convergence near the optimum). Converged starts
leave the batch, so the work shrinks as starts finish (a ``vmap`` runs every start to the
slowest one's length). Bounds (``lower``/``upper``): steps are projected onto the box and a
parameter held on a bound drops out of the step's system; ``minimize_bounded`` bounds the
log-coefficients only in a second phase (see there). BLAS is held to one thread while it runs
(``threadpoolctl``, when installed): on a busy machine idle BLAS threads spin against the
element-wise passes.

Cost. The evaluation passes (``scaling.passes``) are one hand-written numba kernel for every law,
the batched step solve (``damped_steps``) another. On the 240-point Chinchilla data the
4,500-start grid takes ~220k start-iterations (~49 per start, ~40% of them rejected trial steps);
``benchmarks/fit_speed.py`` lists what was tried to cut them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import numba
import numpy as np

from pallas_kernels.cpu import cache as kernel_cache

try:  # a busy machine makes idle BLAS threads spin against the element-wise passes
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it BLAS keeps its default thread count
    threadpool_limits = None

from scaling.passes import (
    LSEModel,
    Penalty,
    build_ops,
    check_weights,
    evaluate,
    select_rows,
)

__all__ = [
    "LSEModel",
    "Penalty",
    "SolveResult",
    "damped_steps",
    "minimize",
    "minimize_bounded",
    "objective",
    "parameter_box",
]

_U_MAX = 650.0  # |u| bound kept by the parameter box: exp(u) never overflows in float64


class SolveResult(NamedTuple):
    theta: np.ndarray  # shape=(B, P), float64: final parameters of every start
    objective: np.ndarray  # shape=(B,), float64
    converged: np.ndarray  # shape=(B,), bool: stopped by the tolerance, not the iteration cap
    n_iter: np.ndarray  # shape=(B,), int64


def parameter_box(model: LSEModel) -> np.ndarray:
    """Per-parameter bound ``hi`` such that ``|theta| <= hi`` keeps every ``|u| <= 650``."""
    m, c = model.design, model.offset
    k_terms, _, p = m.shape
    hi = np.full(p, np.inf)
    for k in range(k_terms):
        scale = np.abs(m[k]).max(axis=0)  # (P,)
        used = scale > 0
        room = max(_U_MAX - float(np.abs(c[k]).max(initial=0.0)), 1.0)
        if used.any():
            hi[used] = np.minimum(hi[used], room / (used.sum() * scale[used]))
    return np.where(np.isfinite(hi), hi, 1e3)


def objective(
    model: LSEModel, theta: np.ndarray, *, penalty: Penalty = Penalty(), weights=None
) -> np.ndarray:
    """The penalised objective at each row of ``theta`` (B, P)."""
    theta = np.atleast_2d(np.asarray(theta, np.float64))
    w = check_weights(weights, theta.shape[0], model.target.shape[0])
    never = np.full(theta.shape[0], -np.inf)  # no row beats it: no derivatives are formed
    return evaluate(build_ops(model), penalty, theta, w, never)[0]


def minimize(
    model: LSEModel,
    theta0: np.ndarray,
    *,
    penalty: Penalty = Penalty(),
    weights: np.ndarray | None = None,
    max_iter: int = 400,
    ftol: float = 1e-10,
    exact_below: float = 1e-6,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
) -> SolveResult:
    """Minimise the penalised objective from every row of ``theta0`` (B, P), all at once.

    ``weights`` (n,) or (B, n) multiply each point's penalty (bootstrap counts, leave-one-out
    zeros). A start stops when an accepted step lowers its objective by at most ``ftol``
    relative, or when no step is accepted even with a damping of 1e12. ``lower``/``upper``
    (P,) bound the parameters (intersected with ``parameter_box``): steps are projected onto
    the box and a parameter on a bound whose gradient points out of the box is held there
    (an active set: its row and column leave the step's system).
    """
    limit = threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext()
    with limit:
        return _minimize(model, theta0, penalty, weights, max_iter, ftol, exact_below,
                         lower, upper)


def minimize_bounded(
    model: LSEModel,
    theta0: np.ndarray,
    *,
    lower: np.ndarray,
    upper: np.ndarray,
    later: np.ndarray,
    groups: np.ndarray | None = None,
    penalty: Penalty = Penalty(),
    weights: np.ndarray | None = None,
    max_iter: int = 400,
) -> SolveResult:
    """``minimize`` inside the box ``lower, upper`` (P,), in two phases.

    Phase 1 bounds only the parameters not in ``later`` (P,) bool: paths from a start grid
    wander through values the box excludes (tiny coefficients), and a projected damped Newton
    crawls along a bound (bounding everything at once took 2.3x the iterations on the
    Chinchilla data, most on starts ending in poor local optima). An optimum inside the box is
    a local optimum of the bounded problem; one outside is not a candidate (objective inf). Where
    an outside optimum beats the best inside one of its group (``groups`` (B,): starts of one
    problem, e.g. one bootstrap replicate; default one group), the data pull the fit out of the
    box: those starts run again from their projection onto the box with every bound.
    """
    theta0 = np.atleast_2d(np.asarray(theta0, np.float64))
    groups = np.zeros(theta0.shape[0], np.int64) if groups is None else np.asarray(groups)
    later = np.asarray(later, bool)
    lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    res = minimize(model, theta0, penalty=penalty, weights=weights, max_iter=max_iter,
                   lower=np.where(later, -np.inf, lower), upper=np.where(later, np.inf, upper))
    theta, obj = res.theta.copy(), res.objective.copy()
    conv, n_iter = res.converged.copy(), res.n_iter.copy()
    outside = np.any((theta < lower) | (theta > upper), axis=1)
    inside_obj = np.where(np.isfinite(obj) & ~outside, obj, np.inf)
    best = np.full(int(groups.max()) + 1, np.inf)
    np.minimum.at(best, groups, inside_obj)
    again = np.flatnonzero(outside & np.isfinite(obj) & (obj < best[groups]))
    obj[outside] = np.inf
    if again.size:
        rerun = minimize(model, np.clip(theta[again], lower, upper), penalty=penalty,
                         weights=select_rows(check_weights(weights, theta.shape[0],
                                                           model.target.shape[0]), again),
                         max_iter=max_iter, lower=lower, upper=upper)
        theta[again], obj[again], conv[again] = rerun.theta, rerun.objective, rerun.converged
        n_iter[again] += rerun.n_iter
    return SolveResult(theta=theta, objective=obj, converged=conv, n_iter=n_iter)


def _box(model: LSEModel, p: int, lower, upper) -> tuple[np.ndarray, np.ndarray]:
    hi = parameter_box(model)
    lo = -hi
    for name, bound, pick in (("lower", lower, np.maximum), ("upper", upper, np.minimum)):
        if bound is None:
            continue
        bound = np.asarray(bound, np.float64)
        if bound.shape != (p,) or np.any(np.isnan(bound)):
            raise ValueError(f"{name} must be a ({p},) array without NaN; got {bound}")
        if name == "lower":
            lo = pick(lo, bound)
        else:
            hi = pick(hi, bound)
    if np.any(lo > hi):
        j = int(np.flatnonzero(lo > hi)[0])
        raise ValueError(f"empty box for parameter {j}: lower {lo[j]} > upper {hi[j]}")
    return lo, hi


def _hold(h, g, theta, lo, hi):
    """Zero the gradient and decouple the rows of parameters held on a bound (in place)."""
    held = ((theta <= lo) & (g > 0)) | ((theta >= hi) & (g < 0))
    rows = np.flatnonzero(held.any(axis=1))
    if rows.size:
        hr, gr, mask = h[rows], g[rows], held[rows]
        gr[mask] = 0.0
        hr[mask[:, :, None] | mask[:, None, :]] = 0.0
        hr[:, np.arange(h.shape[1]), np.arange(h.shape[1])] += mask
        h[rows], g[rows] = hr, gr
    return h, g


def _minimize(model, theta0, penalty, weights, max_iter, ftol, exact_below, lower, upper):
    theta = np.array(np.atleast_2d(theta0), np.float64)
    b, p = theta.shape
    if model.design.shape[2] != p:
        raise ValueError(
            f"theta0 has {p} columns; the model has {model.design.shape[2]} parameters"
        )
    if not 0.0 < penalty.asymmetry < 1.0 or not penalty.delta > 0:
        raise ValueError(f"penalty needs delta > 0 and 0 < asymmetry < 1; got {penalty}")
    if penalty.space not in ("log", "linear"):
        raise ValueError(f"penalty.space must be 'log' or 'linear'; got {penalty.space!r}")
    w_all = check_weights(weights, b, model.target.shape[0])
    lo, hi = _box(model, p, lower, upper)
    theta = np.clip(theta, lo, hi)
    ops = build_ops(model)
    f, _, g, h = evaluate(ops, penalty, theta, w_all)
    exact = np.zeros(b, bool)  # which matrix h holds: the exact Hessian or the IRLS one
    lam = np.full(b, 1e-2)
    converged = np.zeros(b, bool)
    n_iter = np.zeros(b, np.int64)
    live = np.flatnonzero(np.isfinite(f))
    for _ in range(max_iter):
        # a start whose exact-Hessian steps keep failing goes back to the robust IRLS matrix
        back = live[exact[live] & (lam[live] > 1e-3)]
        if back.size:
            _, _, g[back], h[back] = evaluate(ops, penalty, theta[back], select_rows(w_all, back))
            exact[back] = False
        if live.size == 0:
            break
        la, fl = lam[live], f[live]
        hl, gl = _hold(h[live], g[live], theta[live], lo, hi)
        step = damped_steps(hl, gl, la)
        trial = np.clip(theta[live] + step, lo, hi)
        exact_next = la / 10.0 <= exact_below
        ft, ok, gt, ht = evaluate(ops, penalty, trial, select_rows(w_all, live), fl, exact_next)
        done = (ok & (fl - ft <= ftol * np.abs(fl))) | (la > 1e12)
        acc = live[ok]
        theta[acc], f[acc], g[acc], h[acc] = trial[ok], ft[ok], gt[ok], ht[ok]
        exact[acc] = exact_next[ok]
        lam[live] = np.clip(np.where(ok, la / 10.0, la * 10.0), 1e-9, 1e13)
        n_iter[live] += 1
        converged[live[done]] = True
        live = live[~done]
    return SolveResult(theta=theta, objective=f, converged=converged, n_iter=n_iter)


@numba.njit(error_model="numpy")
def damped_steps(h, g, lam):  # pragma: no cover - compiled
    """Levenberg-Marquardt steps ``(H + lam |diag H|) step = -g`` for every row, by Gaussian
    elimination with partial pivoting; a singular or non-finite system gives a zero step."""
    b, p = g.shape
    out = np.zeros((b, p))
    a = np.empty((p, p))
    x = np.empty(p)
    for r in range(b):
        for i in range(p):
            for j in range(p):
                a[i, j] = h[r, i, j]
            a[i, i] += lam[r] * (abs(h[r, i, i]) + 1e-12)
            x[i] = -g[r, i]
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(x))):
            continue
        singular = False
        for c in range(p):
            piv = c
            for i in range(c + 1, p):
                if abs(a[i, c]) > abs(a[piv, c]):
                    piv = i
            if a[piv, c] == 0.0:
                singular = True
                break
            if piv != c:
                for j in range(p):
                    a[c, j], a[piv, j] = a[piv, j], a[c, j]
                x[c], x[piv] = x[piv], x[c]
            for i in range(c + 1, p):
                m = a[i, c] / a[c, c]
                for j in range(c, p):
                    a[i, j] -= m * a[c, j]
                x[i] -= m * x[c]
        if singular:
            continue
        for i in range(p - 1, -1, -1):
            acc = x[i]
            for j in range(i + 1, p):
                acc -= a[i, j] * out[r, j]
            out[r, i] = acc / a[i, i]
        if not np.all(np.isfinite(out[r])):
            out[r] = 0.0
    return out


_CACHE = kernel_cache.kernel_cache_dir(Path(__file__), what="compiled scaling-law solves")
if _CACHE is not None:  # a private per-user folder under $SPARSEJAX_CACHE_DIR (pickled code)
    kernel_cache.enable([damped_steps], _CACHE)
