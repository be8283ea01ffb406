"""Evaluation passes of the batched solver (``scaling.solver``): the penalised objective, its
gradient and the IRLS / exact Hessian matrix for many starts at once, in float64 numpy.

Model. For data point i the predicted log-loss is ``LSE_k(u_ik)``, ``u_ik = M_ik . theta + c_ik``
(every term linear in the parameters). The penalty is ``sum_i w_i kappa(r_i) Huber_delta(r_i)``
with ``r = pred - obs`` in log space (or ``exp(pred) - loss`` in linear space) and ``kappa`` the
asymmetry weight.

Cost. A pass touches each (start, point) pair a few dozen times, so it runs on slices of
``_CHUNK`` start-points (cache-sized temporaries); a term that is the same at every point
(``e`` in the Chinchilla law, ``log g`` in Frantar's) costs one ``exp`` per start, not per
point; matrix entries come from one small matmul per term pair over the non-zero columns of
``M_ik M_ij^T``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

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


def build_ops(model: LSEModel) -> _Ops:
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


def objective_parts(model, ops, pen, theta, weights):
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


def derivatives(ops, pen, parts, exact):
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
        ce = (ar[exact] <= pen.delta) * (1.0 if w is None else select_rows(w, exact))
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


def evaluate(model, ops, pen, theta, weights, f_old=None, exact_next=None):
    """Objective at ``theta`` (B,); gradient and matrix where it beats ``f_old`` (all if None).

    Returns ``(f, ok, g, h)``: g and h are filled on rows ``ok`` (IRLS matrix, or the exact
    Hessian on rows with ``exact_next``) and zero elsewhere.
    """
    f, parts = objective_parts(model, ops, pen, theta, weights)
    b, p = theta.shape
    ok = np.isfinite(f) if f_old is None else np.isfinite(f) & (f < f_old)
    if ok.all():
        g, h = derivatives(ops, pen, parts, exact_next)
        return f, ok, g, h
    g, h = np.zeros((b, p)), np.zeros((b, p, p))
    if ok.any():
        ex, s, r, d1w, w = parts
        sub = ([e[ok] for e in ex], s[ok], r[ok], d1w[ok], select_rows(w, ok))
        g[ok], h[ok] = derivatives(ops, pen, sub, None if exact_next is None else exact_next[ok])
    return f, ok, g, h


def evaluate_chunked(model, ops, pen, theta, weights, f_old=None, exact_next=None):
    """``evaluate`` over slices of ``_CHUNK`` start-points (cache-sized temporaries)."""
    fn = functools.partial(evaluate, model, ops, pen)
    return in_chunks(fn, model.target.shape[0], theta, weights, f_old, exact_next)


def in_chunks(fn, n, theta, weights, f_old=None, exact_next=None):
    """``fn(theta, weights, f_old, exact_next) -> (f, ok, g, h)`` on slices of
    ``_CHUNK // n`` starts, outputs concatenated (shared weights pass through whole)."""
    size = max(1, _CHUNK // n)
    if theta.shape[0] <= size:
        return fn(theta, weights, f_old, exact_next)
    parts = []
    for i in range(0, theta.shape[0], size):
        sl = slice(i, i + size)
        parts.append(
            fn(
                theta[sl],
                select_rows(weights, sl),
                None if f_old is None else f_old[sl],
                None if exact_next is None else exact_next[sl],
            )
        )
    return tuple(np.concatenate([q[j] for q in parts]) for j in range(4))


def check_weights(weights, b, n):
    if weights is None:
        return None
    w = np.asarray(weights, np.float64)
    w = w.reshape(1, n) if w.ndim == 1 and w.shape[0] == n else w
    if w.shape not in ((1, n), (b, n)) or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(
            f"weights must be finite, >= 0, of shape ({n},) or ({b}, {n}); got {w.shape}"
        )
    return w


def select_rows(w, idx):
    """Rows ``idx`` of per-start weights (shared weights pass through)."""
    return w if w is None or w.shape[0] == 1 else w[idx]
