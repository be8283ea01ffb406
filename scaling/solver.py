"""Batched robust fits of log-sum-exp-linear models: a damped Newton (Levenberg-Marquardt) loop
run on thousands of starts at once, in float64 numpy.

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
slowest one's length). BLAS is held to one thread while it runs (``threadpoolctl``, when
installed): on a busy machine idle BLAS threads spin against the element-wise passes.

Cost. A pass touches each (start, point) pair a few dozen times, so it runs on slices of
``_CHUNK`` start-points (cache-sized temporaries); a term that is the same at every point
(``e`` in the Chinchilla law, ``log g`` in Frantar's) costs one ``exp`` per start, not per
point; matrix entries come from one small matmul per term pair over the non-zero columns of
``M_ik M_ij^T``. On the 240-point Chinchilla data the 4,500-start grid takes ~220k
start-iterations (~49 per start, ~40% of them rejected trial steps).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

try:  # a busy machine makes idle BLAS threads spin against the element-wise passes
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it BLAS keeps its default thread count
    threadpool_limits = None

_U_MAX = 650.0  # |u| bound kept by the parameter box: exp(u) never overflows in float64
_CHUNK = 16_000  # starts x points per pass: cache-sized temporaries are much faster


class LSEModel(NamedTuple):
    """A log-sum-exp-linear model and its data."""

    design: np.ndarray  # shape=(K, n, P), float64: u[k, i] = design[k, i] @ theta + offset[k, i]
    offset: np.ndarray  # shape=(K, n), float64
    target: np.ndarray  # shape=(n,), float64: log loss (space="log") or loss (space="linear")


class Penalty(NamedTuple):
    """Huber penalty on residuals, optionally asymmetric (``asymmetry`` = 0.5 is symmetric)."""

    delta: float = 1e-3
    asymmetry: float = 0.5  # residuals with observed > predicted weigh 2*asymmetry, else 2*(1-it)
    space: str = "log"  # "log": r = log pred - log obs; "linear": r = pred - obs


class SolveResult(NamedTuple):
    theta: np.ndarray  # shape=(B, P), float64: final parameters of every start
    objective: np.ndarray  # shape=(B,), float64
    converged: np.ndarray  # shape=(B,), bool: stopped by the tolerance, not the iteration cap
    n_iter: np.ndarray  # shape=(B,), int64


class _Term(NamedTuple):
    """One log-sum-exp term: ``u = theta[:, cols] @ mt (+ offset)``; constant over the points
    when ``mt`` has a single column (then ``exp(u)`` is one number per start)."""

    cols: np.ndarray  # parameters the term uses
    mt: np.ndarray  # (len(cols), n) or (len(cols), 1) when the term is the same at every point
    offset: np.ndarray | None  # (n,) or (1,)


class _Pair(NamedTuple):
    """Columns of the flattened (P P) matrix fed by ``sum_i c_i e_ik e_il (M_ik M_il^T + tr)``."""

    k: int
    j: int
    cols: np.ndarray
    outer: np.ndarray  # (n, len(cols)); (1, len(cols)) when both terms are constant


class _Ops(NamedTuple):
    """Data-derived constants shared by all passes."""

    terms: tuple  # _Term per term
    pairs: tuple  # _Pair per term pair k <= j (the Gauss-Newton part)
    diag: tuple  # _Pair per term (k, k): the second-order part of the exact Hessian
    grad: tuple  # (n, len(cols)) or (1, len(cols)) per term: M_k over its columns
    n_par: int
    n_const: int  # terms constant over the points
    scatter: tuple  # 0/1 matrices from the concatenated blocks to g (P) and h (P P) columns


def _pair(m, k, j, const):
    o = np.einsum("np,nq->npq", m[k], m[j])
    o = (o if k == j else o + o.transpose(0, 2, 1)).reshape(m.shape[1], -1)
    cols = np.flatnonzero(np.any(o != 0, axis=0))
    o = o[:1] if const[k] and const[j] else o
    return _Pair(k, j, cols, np.ascontiguousarray(o[:, cols]))


def _ops(model: LSEModel) -> _Ops:
    m, c = model.design, model.offset
    k_terms = m.shape[0]
    const = [bool(np.all(m[k] == m[k, :1]) and np.all(c[k] == c[k, 0])) for k in range(k_terms)]
    terms, grad = [], []
    for k in range(k_terms):
        cols = np.flatnonzero(np.any(m[k] != 0, axis=0))
        mk = m[k][:1] if const[k] else m[k]
        off = c[k][:1] if const[k] else c[k]
        terms.append(_Term(cols, np.ascontiguousarray(mk[:, cols].T), off if off.any() else None))
        grad.append(np.ascontiguousarray(mk[:, cols]))
    pairs = tuple(_pair(m, k, j, const) for k in range(k_terms) for j in range(k, k_terms))
    diag = tuple(_pair(m, k, k, const) for k in range(k_terms))
    p = m.shape[2]
    scatter = (
        _scatter([t.cols for t in terms], p),
        _scatter([b.cols for b in pairs], p * p),
        _scatter([b.cols for b in diag], p * p),
    )
    return _Ops(tuple(terms), pairs, diag, tuple(grad), p, int(sum(const)), scatter)


def _scatter(cols, width):
    idx = np.concatenate(cols)
    out = np.zeros((idx.size, width))
    out[np.arange(idx.size), idx] = 1.0
    return out


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


def _objective_parts(model, ops, pen, theta, weights):
    """Objective (B,) and what the derivatives need: term exponentials, sums, residuals."""
    ex = []
    for t in ops.terms:
        u = theta[:, t.cols] @ t.mt
        if t.offset is not None:
            u += t.offset
        ex.append(np.exp(u, out=u))
    var = [e for e in ex if e.shape[1] > 1]
    const = sum(e for e in ex if e.shape[1] == 1)  # (B, 1), or 0 without constant terms
    if not var:
        s = const * np.ones_like(model.target)
    else:
        s = var[0] + var[1] if len(var) > 1 else var[0] + const
        for e in var[2:]:
            s += e
        if len(var) > 1 and ops.n_const:
            s += const
    r = np.log(s) if pen.space == "log" else s.copy()
    r -= model.target
    d1 = np.maximum(r, -pen.delta)  # rho'(r) = clip(r, -delta, delta)
    np.minimum(d1, pen.delta, out=d1)
    if pen.asymmetry != 0.5:
        kappa = np.where(r < 0, 2.0 * pen.asymmetry, 2.0 * (1.0 - pen.asymmetry))
        weights = kappa if weights is None else weights * kappa
    d1w = d1 if weights is None else d1 * weights
    # Huber_delta(r) = rho'(r) (r - rho'(r) / 2)
    f = np.einsum("bn,bn->b", d1w, r) - 0.5 * np.einsum("bn,bn->b", d1w, d1)
    return f, (ex, s, r, d1w, weights)


def _derivatives(ops, pen, parts, exact):
    """Gradient (B,P) and the IRLS matrix, or the exact Hessian on rows ``exact``, (B,P,P)."""
    ex, s, r, d1w, w = parts
    b, p = r.shape[0], ops.n_par
    ar = np.abs(r)
    c2 = np.maximum(ar, pen.delta)  # IRLS: Huber weights min(1, delta/|r|) (/ s^2 in log space)
    if pen.space == "log":  # J = sum_k e_k M_k / s
        c2 *= s
        c2 *= s
        q = d1w / s
    else:  # dr = sum_k e_k M_k
        q = d1w
    np.divide(pen.delta, c2, out=c2)
    if w is not None:
        c2 *= w
    if exact is not None and exact.any():  # rho'' - rho' (log) or rho'' (linear)
        ce = (ar[exact] <= pen.delta) * (1.0 if w is None else _rows(w, exact))
        c2[exact] = (ce - d1w[exact]) / s[exact] ** 2 if pen.space == "log" else ce
    ones = np.ones(r.shape[1])
    q_sum, c_sum = q @ ones, c2 @ ones
    v = [q * e if e.shape[1] > 1 else q_sum[:, None] * e for e in ex]
    g = np.concatenate(
        [vk @ gm if vk.shape[1] > 1 else vk * gm[0] for vk, gm in zip(v, ops.grad, strict=True)],
        axis=1,
    )
    g = g @ ops.scatter[0]
    ce = [c2 * e if e.shape[1] > 1 else None for e in ex]
    hs = []
    for pr in ops.pairs:
        ek, ej = ex[pr.k], ex[pr.j]
        if ce[pr.k] is not None and ce[pr.j] is not None:
            hs.append((ce[pr.k] * ej) @ pr.outer)
        elif ce[pr.k] is not None:
            hs.append((ce[pr.k] @ pr.outer) * ej)
        elif ce[pr.j] is not None:
            hs.append((ce[pr.j] @ pr.outer) * ek)
        else:
            hs.append((c_sum[:, None] * ek * ej) * pr.outer[0])
    h = np.concatenate(hs, axis=1) @ ops.scatter[1]
    if exact is not None and exact.any():  # + sum_i rho'_i sum_k e_ik M_ik M_ik^T (/ s)
        hd = [
            vk @ pr.outer if vk.shape[1] > 1 else vk * pr.outer[0]
            for pr, vk in zip(ops.diag, v, strict=True)
        ]
        h += (np.concatenate(hd, axis=1) @ ops.scatter[2]) * exact[:, None]
    return g, h.reshape(b, p, p)


def _evaluate(model, ops, pen, theta, weights, f_old=None, exact_next=None):
    """Objective at ``theta`` (B,); gradient and matrix where it beats ``f_old`` (all if None).

    Returns ``(f, ok, g, h)``: g and h are filled on rows ``ok`` (IRLS matrix, or the exact
    Hessian on rows with ``exact_next``) and zero elsewhere.
    """
    f, parts = _objective_parts(model, ops, pen, theta, weights)
    b, p = theta.shape
    ok = np.isfinite(f) if f_old is None else np.isfinite(f) & (f < f_old)
    if ok.all():
        g, h = _derivatives(ops, pen, parts, exact_next)
        return f, ok, g, h
    g, h = np.zeros((b, p)), np.zeros((b, p, p))
    if ok.any():
        ex, s, r, d1w, w = parts
        sub = ([e[ok] for e in ex], s[ok], r[ok], d1w[ok], _rows(w, ok))
        g[ok], h[ok] = _derivatives(ops, pen, sub, None if exact_next is None else exact_next[ok])
    return f, ok, g, h


def _evaluate_chunked(model, ops, pen, theta, weights, f_old=None, exact_next=None):
    k_terms, n, _ = model.design.shape
    size = max(1, _CHUNK // n)
    if theta.shape[0] <= size:
        return _evaluate(model, ops, pen, theta, weights, f_old, exact_next)
    parts = []
    for i in range(0, theta.shape[0], size):
        sl = slice(i, i + size)
        parts.append(
            _evaluate(
                model,
                ops,
                pen,
                theta[sl],
                _rows(weights, sl),
                None if f_old is None else f_old[sl],
                None if exact_next is None else exact_next[sl],
            )
        )
    return tuple(np.concatenate([q[j] for q in parts]) for j in range(4))


def objective(
    model: LSEModel, theta: np.ndarray, *, penalty: Penalty = Penalty(), weights=None
) -> np.ndarray:
    """The penalised objective at each row of ``theta`` (B, P)."""
    theta = np.atleast_2d(np.asarray(theta, np.float64))
    w = _weights(weights, theta.shape[0], model.target.shape[0])
    return _objective_parts(model, _ops(model), penalty, theta, w)[0]


def _weights(weights, b, n):
    if weights is None:
        return None
    w = np.asarray(weights, np.float64)
    w = w.reshape(1, n) if w.ndim == 1 and w.shape[0] == n else w
    if w.shape not in ((1, n), (b, n)) or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(
            f"weights must be finite, >= 0, of shape ({n},) or ({b}, {n}); got {w.shape}"
        )
    return w


def _rows(w, idx):
    """Rows ``idx`` of per-start weights (shared weights pass through)."""
    return w if w is None or w.shape[0] == 1 else w[idx]


def minimize(
    model: LSEModel,
    theta0: np.ndarray,
    *,
    penalty: Penalty = Penalty(),
    weights: np.ndarray | None = None,
    max_iter: int = 400,
    ftol: float = 1e-10,
    exact_below: float = 1e-6,
) -> SolveResult:
    """Minimise the penalised objective from every row of ``theta0`` (B, P), all at once.

    ``weights`` (n,) or (B, n) multiply each point's penalty (bootstrap counts, leave-one-out
    zeros). A start stops when an accepted step lowers its objective by at most ``ftol``
    relative, or when no step is accepted even with a damping of 1e12.
    """
    limit = threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext()
    with limit:
        return _minimize(model, theta0, penalty, weights, max_iter, ftol, exact_below)


def _minimize(model, theta0, penalty, weights, max_iter, ftol, exact_below):
    theta = np.array(np.atleast_2d(theta0), np.float64)
    b, p = theta.shape
    if model.design.shape[2] != p:
        raise ValueError(
            f"theta0 has {p} columns; the model has {model.design.shape[2]} parameters"
        )
    if not 0.0 < penalty.asymmetry < 1.0 or not penalty.delta > 0:
        raise ValueError(f"penalty needs delta > 0 and 0 < asymmetry < 1; got {penalty}")
    w_all = _weights(weights, b, model.target.shape[0])
    ops = _ops(model)
    hi = parameter_box(model)
    theta = np.clip(theta, -hi, hi)
    f, _, g, h = _evaluate_chunked(model, ops, penalty, theta, w_all)
    exact = np.zeros(b, bool)  # which matrix h holds: the exact Hessian or the IRLS one
    lam = np.full(b, 1e-2)
    converged = np.zeros(b, bool)
    n_iter = np.zeros(b, np.int64)
    live = np.flatnonzero(np.isfinite(f))
    eye = np.eye(p)
    for _ in range(max_iter):
        # a start whose exact-Hessian steps keep failing goes back to the robust IRLS matrix
        back = live[exact[live] & (lam[live] > 1e-3)]
        if back.size:
            _, _, g[back], h[back] = _evaluate_chunked(
                model, ops, penalty, theta[back], _rows(w_all, back)
            )
            exact[back] = False
        if live.size == 0:
            break
        hl, la, fl = h[live], lam[live], f[live]
        diag = np.abs(np.diagonal(hl, axis1=1, axis2=2)) + 1e-12
        step = _solve(hl + (la[:, None] * diag)[:, :, None] * eye, -g[live])
        trial = np.clip(theta[live] + step, -hi, hi)
        exact_next = la / 10.0 <= exact_below
        ft, ok, gt, ht = _evaluate_chunked(
            model, ops, penalty, trial, _rows(w_all, live), fl, exact_next
        )
        done = (ok & (fl - ft <= ftol * np.abs(fl))) | (la > 1e12)
        acc = live[ok]
        theta[acc], f[acc], g[acc], h[acc] = trial[ok], ft[ok], gt[ok], ht[ok]
        exact[acc] = exact_next[ok]
        lam[live] = np.clip(np.where(ok, la / 10.0, la * 10.0), 1e-9, 1e13)
        n_iter[live] += 1
        converged[live[done]] = True
        live = live[~done]
    return SolveResult(theta=theta, objective=f, converged=converged, n_iter=n_iter)


def _solve(mat: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched solve; singular or non-finite systems give a zero step (rejected, damping grows)."""
    good = np.all(np.isfinite(mat), axis=(1, 2)) & np.all(np.isfinite(rhs), axis=1)
    out = np.zeros_like(rhs)
    if good.any():
        try:
            out[good] = np.linalg.solve(mat[good], rhs[good][..., None])[..., 0]
        except np.linalg.LinAlgError:
            for i in np.flatnonzero(good):
                try:
                    out[i] = np.linalg.solve(mat[i], rhs[i])
                except np.linalg.LinAlgError:
                    out[i] = 0.0
    return np.where(np.isfinite(out), out, 0.0)
