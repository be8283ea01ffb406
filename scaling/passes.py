"""Evaluation passes of the batched solver (``scaling.solver``), compiled once with numba.

Model. For data point i the predicted log-loss is ``LSE_k(u_ik)``, ``u_ik = M_ik . theta + c_ik``
(every term linear in the parameters). The penalty is ``sum_i w_i kappa(r_i) Huber_delta(r_i)``
with ``r = pred - obs`` in log space (``log sum_k exp(u_k) - log L``) or linear space
(``sum_k exp(u_k) - L``), ``kappa`` the asymmetry weight (``2 asymmetry`` where ``r < 0``, i.e.
the point lies above the fit, else ``2 (1 - asymmetry)``).

``evaluate`` gives the objective at every start and, where a trial step is accepted, the
gradient and either the IRLS (Gauss-Newton with Huber weights ``min(1, delta/|r|)``) matrix or
the exact Hessian. One hand-written kernel serves every law: it reads the design matrix as data
(which parameters each term uses come from its non-zero columns), so no code is generated per
law. numpy computes the exponentials and logarithms (its SIMD ``exp``/``log`` are several times
faster than numba's scalar libm calls); the kernel does everything after them, one start at a
time over point-contiguous rows that stay in L1 cache. A term that is the same at every point
(``e`` in the Chinchilla law, ``log g`` in Frantar's) costs one ``exp`` per start.

Compiled on first use (a few seconds) and cached on disk by numba in a private per-user folder
under ``$SPARSEJAX_CACHE_DIR`` (default ``~/.cache/sparsejax``; ``pallas_kernels.cpu.cache``):
numba's cache loads pickled code, so a folder that others can write is refused (one warning,
no disk cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numba
import numpy as np

from pallas_kernels.cpu import cache as kernel_cache

_CHUNK = 16_000  # starts x points per pass: cache-sized temporaries
# reassociation lets the point loops vectorise; no nnan/ninf: infinities must compare correctly
_FAST = {"reassoc", "contract", "nsz", "arcp"}


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


class Ops(NamedTuple):
    """The model split for the kernel: terms varying over the points and constant terms."""

    mv: np.ndarray  # (Kv, P, n): design of the varying terms, points last
    vcols: tuple  # per varying term: the columns it uses (int64 array)
    vmt: tuple  # per varying term: mv[k, vcols[k]], (len(cols), n)
    voff: tuple  # per varying term: its offset (n,), or None where it is zero
    mc: np.ndarray  # (Kc, P): design of the constant terms
    cc: np.ndarray  # (Kc,): their offsets
    vpairs: np.ndarray  # (m, 2) int64: (k, q) with column q of varying term k non-zero
    cpairs: np.ndarray  # (m, 2) int64: the same for the constant terms
    vtrip: np.ndarray  # (m, 3) int64: (k, q, t), q <= t, both columns of varying term k used
    ctrip: np.ndarray  # (m, 3) int64: the same for the constant terms
    target: np.ndarray  # (n,)


def _pairs(used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, q) and (k, q, t >= q) index lists over the used columns ``used`` (K, P) of each term."""
    pairs = [(k, q) for k in range(used.shape[0]) for q in np.flatnonzero(used[k])]
    trip = [(k, q, t) for k, q in pairs for t in np.flatnonzero(used[k]) if t >= q]
    return np.array(pairs, np.int64).reshape(-1, 2), np.array(trip, np.int64).reshape(-1, 3)


def build_ops(model: LSEModel) -> Ops:
    """Split ``model`` into varying and constant terms and list the columns each term uses."""
    m, c = model.design, model.offset
    k_terms, n, p = m.shape
    const = np.array([np.all(m[k] == m[k, :1]) and np.all(c[k] == c[k, 0]) for k in range(k_terms)])
    mv = np.ascontiguousarray(m[~const].transpose(0, 2, 1), np.float64).reshape(-1, p, n)
    mc = np.ascontiguousarray(m[const, 0], np.float64).reshape(-1, p)
    vpairs, vtrip = _pairs(np.any(mv != 0, axis=2))
    cpairs, ctrip = _pairs(mc != 0)
    vcols = tuple(np.flatnonzero(np.any(mv[k] != 0, axis=1)) for k in range(mv.shape[0]))
    cv = np.ascontiguousarray(c[~const], np.float64).reshape(-1, n)
    return Ops(
        mv=mv,
        vcols=vcols,
        vmt=tuple(np.ascontiguousarray(mv[k, cols]) for k, cols in enumerate(vcols)),
        voff=tuple(row if row.any() else None for row in cv),
        mc=mc,
        cc=np.ascontiguousarray(c[const, 0], np.float64),
        vpairs=vpairs,
        cpairs=cpairs,
        vtrip=vtrip,
        ctrip=ctrip,
        target=np.ascontiguousarray(model.target, np.float64),
    )


@numba.njit(fastmath=_FAST, error_model="numpy")
def _kernel(  # pragma: no cover - compiled
    ev,
    ec,
    s,
    pred,
    mv,
    mc,
    vpairs,
    cpairs,
    vtrip,
    ctrip,
    target,
    w,
    delta,
    kneg,
    kpos,
    log_space,
    f_old,
    exact,
    f,
    ok,
    g,
    h,
):
    """The objective of every start into ``f``; where it beats ``f_old`` (``ok``), the gradient
    into ``g`` and the IRLS matrix, or the exact Hessian where ``exact``, into ``h``. Loops over
    points run on 1-D rows, so they vectorise."""
    kv, b, n = ev.shape
    p = g.shape[1]
    dw, cw, inv, cj = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    jac = np.empty((p, n))
    for r in range(b):
        wr, pr, sr = w[r if w.shape[0] > 1 else 0], pred[r], s[r]
        fs = 0.0
        for i in range(n):  # objective: sum w kappa Huber(r), Huber = rho'(r) (r - rho'(r) / 2)
            res = pr[i] - target[i]
            d = min(max(res, -delta), delta)
            fs += wr[i] * (kneg if res < 0.0 else kpos) * d * (res - 0.5 * d)
        f[r] = fs
        ok[r] = fs < f_old[r] and np.isfinite(fs)
        if not ok[r]:
            continue
        ex = exact[r]
        # per-point weights: w kappa rho'(r) (dw) and of J J^T (cw): the exact Hessian's
        # rho''(r) (less rho'(r) in log space, from d^2 log s), or IRLS's min(1, delta / |r|)
        for i in range(n):
            res = pr[i] - target[i]
            d = min(max(res, -delta), delta)
            wk = wr[i] * (kneg if res < 0.0 else kpos)
            dw[i] = wk * d
            if ex:
                cw[i] = wk * (1.0 if abs(res) <= delta else 0.0) - (dw[i] if log_space else 0.0)
            else:
                cw[i] = wk * delta / max(abs(res), delta)
        for i in range(n):
            inv[i] = 1.0 / sr[i] if log_space else 1.0  # d log s = ds / s in log space
        jac[:, :] = 0.0  # J_q = sum_k e_k M_kq (/ s in log space: each e_k / s <= 1)
        for m in range(vpairs.shape[0]):
            jq, ek, mkq = jac[vpairs[m, 1]], ev[vpairs[m, 0], r], mv[vpairs[m, 0], vpairs[m, 1]]
            for i in range(n):
                jq[i] += ek[i] * inv[i] * mkq[i]
        for m in range(cpairs.shape[0]):
            k, q = cpairs[m, 0], cpairs[m, 1]
            jq, cq = jac[q], ec[k, r] * mc[k, q]
            for i in range(n):
                jq[i] += cq * inv[i]
        for q in range(p):
            jq, acc = jac[q], 0.0
            for i in range(n):
                acc += dw[i] * jq[i]
                cj[i] = cw[i] * jq[i]
            g[r, q] = acc
            for t in range(q, p, 2):  # two sums per pass: fewer loads, two add chains
                t1 = min(t + 1, p - 1)
                jt, jt1, s0, s1 = jac[t], jac[t1], 0.0, 0.0
                for i in range(n):
                    s0 += cj[i] * jt[i]
                    s1 += cj[i] * jt1[i]
                h[r, q, t] = h[r, t, q] = s0
                h[r, q, t1] = h[r, t1, q] = s1
        if not ex:
            continue
        for m in range(vtrip.shape[0]):  # + sum_i rho'_i sum_k e_ik M_ik M_ik^T (/ s)
            k, q, t = vtrip[m, 0], vtrip[m, 1], vtrip[m, 2]
            ek, mq, mt, acc = ev[k, r], mv[k, q], mv[k, t], 0.0
            for i in range(n):
                acc += dw[i] * ek[i] * inv[i] * mq[i] * mt[i]
            h[r, q, t] += acc
            if q != t:
                h[r, t, q] += acc
        if ctrip.shape[0]:
            sdi = 0.0
            for i in range(n):
                sdi += dw[i] * inv[i]
            for m in range(ctrip.shape[0]):
                k, q, t = ctrip[m, 0], ctrip[m, 1], ctrip[m, 2]
                acc = ec[k, r] * mc[k, q] * mc[k, t] * sdi
                h[r, q, t] += acc
                if q != t:
                    h[r, t, q] += acc


def _evaluate_block(ops, pen, theta, w, f_old, exact):
    b, p = theta.shape
    n = ops.target.shape[0]
    ev = np.empty((len(ops.vcols), b, n))
    for k, (cols, mt, off) in enumerate(zip(ops.vcols, ops.vmt, ops.voff, strict=True)):
        np.matmul(theta[:, cols], mt, out=ev[k])
        if off is not None:
            ev[k] += off
        np.exp(ev[k], out=ev[k])
    ec = np.exp(theta @ ops.mc.T + ops.cc).T.copy()  # (Kc, b)
    s = np.empty((b, n))
    s[:] = ec.sum(axis=0)[:, None]
    for k in range(ev.shape[0]):
        s += ev[k]
    log_space = pen.space == "log"
    pred = np.log(s) if log_space else s
    f, ok = np.empty(b), np.empty(b, np.bool_)
    g, h = np.zeros((b, p)), np.zeros((b, p, p))
    asym = float(pen.asymmetry)
    _kernel(
        ev, ec, s, pred, ops.mv, ops.mc, ops.vpairs, ops.cpairs, ops.vtrip, ops.ctrip,
        ops.target, w, float(pen.delta), 2.0 * asym, 2.0 * (1.0 - asym), log_space,
        f_old, exact, f, ok, g, h,
    )  # fmt: skip
    return f, ok, g, h


def evaluate(
    ops: Ops,
    pen: Penalty,
    theta: np.ndarray,
    weights: np.ndarray | None,
    f_old: np.ndarray | None = None,
    exact_next: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Objective at ``theta`` (B, P); gradient and matrix where it beats ``f_old`` (all if None).

    ``weights``: None, (1, n) or (B, n) (``check_weights``). Returns ``(f, ok, g, h)``: ``g``
    (B, P) and ``h`` (B, P, P) are filled on rows ``ok`` (the IRLS matrix, or the exact Hessian
    on rows with ``exact_next``) and zero elsewhere. Runs on slices of ``_CHUNK // n`` starts.
    """
    theta = np.ascontiguousarray(theta, np.float64)
    b, n = theta.shape[0], ops.target.shape[0]
    w = np.ones((1, n)) if weights is None else np.ascontiguousarray(weights, np.float64)
    f_old = np.full(b, np.inf) if f_old is None else np.ascontiguousarray(f_old, np.float64)
    exact = np.zeros(b, np.bool_) if exact_next is None else np.ascontiguousarray(exact_next)
    size = max(1, _CHUNK // n)
    parts = []
    for i in range(0, b, size):
        sl = slice(i, i + size)
        parts.append(_evaluate_block(ops, pen, theta[sl], select_rows(w, sl), f_old[sl], exact[sl]))
    return tuple(np.concatenate([q[j] for q in parts]) for j in range(4))


def check_weights(weights, b: int, n: int) -> np.ndarray | None:
    """Weights as None, (1, n) or (b, n), finite and >= 0 (else ValueError)."""
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


_CACHE = kernel_cache.kernel_cache_dir(Path(__file__), what="compiled scaling-law passes")
if _CACHE is not None:  # a private per-user folder under $SPARSEJAX_CACHE_DIR (pickled code)
    kernel_cache.enable([_kernel], _CACHE)
