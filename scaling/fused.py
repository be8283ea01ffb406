"""Fused evaluation passes of the batched solver, compiled with numba.

Same contract as ``scaling.passes.evaluate``: the penalised objective at every start, and the
gradient and IRLS / exact Hessian matrix where a trial step is accepted. numpy still computes
the transcendental functions (``exp`` of each term, ``log`` of the sums): its SIMD
implementations are several times faster than numba's scalar libm calls. Everything after them
(residuals, Huber weights, the objective, the per-point Jacobian and the 15 or 28 matrix sums)
runs in one compiled loop per start whose inner loops over the points vectorise, instead of the
few dozen full-size numpy temporaries ``scaling.passes`` makes. On the 240-point Chinchilla grid
this cuts the time per start-iteration several-fold (``benchmarks/fit_speed.py``).

Kernels are compiled on first use (a few seconds) and cached on disk by numba.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numba
import numpy as np

from scaling.passes import LSEModel, Penalty, in_chunks

# reassociation lets the point loops vectorise; no nnan/ninf: infinities must compare correctly
_FAST = {"reassoc", "contract", "nsz", "arcp"}


class FusedOps(NamedTuple):
    """Data-derived constants for the fused passes."""

    var: tuple  # (cols, mt (len(cols), n), offset (n,) | None) per term varying over points
    const: tuple  # (cols, m (len(cols),), offset float) per term constant over the points
    mv: np.ndarray  # (Kv, P, n): design of the varying terms, points last
    mc: np.ndarray  # (Kc, P): design of the constant terms
    target: np.ndarray  # (n,)
    structure: tuple  # (P, var columns, const columns): what the generated kernel is built from


def build_fused_ops(model: LSEModel) -> FusedOps:
    m, c = model.design, model.offset
    k_terms, n, p = m.shape
    var, const, mv, mc = [], [], [], []
    for k in range(k_terms):
        cols = np.flatnonzero(np.any(m[k] != 0, axis=0))
        if np.all(m[k] == m[k, :1]) and np.all(c[k] == c[k, 0]):
            const.append((cols, np.ascontiguousarray(m[k, 0, cols]), float(c[k, 0])))
            mc.append(m[k, 0])
        else:
            off = np.ascontiguousarray(c[k]) if c[k].any() else None
            var.append((cols, np.ascontiguousarray(m[k][:, cols].T), off))
            mv.append(m[k].T)
    mv_arr = np.ascontiguousarray(np.array(mv, np.float64).reshape(len(var), p, n))
    mc_arr = np.ascontiguousarray(np.array(mc, np.float64).reshape(len(const), p))
    return FusedOps(
        tuple(var),
        tuple(const),
        mv_arr,
        mc_arr,
        np.ascontiguousarray(model.target, np.float64),
        (
            p,
            tuple(tuple(_column(mv_arr[k, q], True) for q in range(p)) for k in range(len(var))),
            tuple(
                tuple(_column(mc_arr[k, q : q + 1], False) for q in range(p))
                for k in range(len(const))
            ),
        ),
    )


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _sums(ev, ec):  # pragma: no cover - compiled
    kv, b, n = ev.shape
    s = np.empty((b, n))
    for r in range(b):
        base = 0.0
        for k in range(ec.shape[0]):
            base += ec[k, r]
        for i in range(n):
            s[r, i] = base
        for k in range(kv):
            for i in range(n):
                s[r, i] += ev[k, r, i]
    return s


def _column(m: np.ndarray, varying: bool) -> str | float | None:
    """How a design column enters the generated code: None (zero), 1.0 or -1.0 (a literal), or
    "array" / "scalar" (read from the design: other values stay data, so new data with the same
    structure reuses the compiled kernel)."""
    if not np.any(m):
        return None
    if np.all(m == m[0]) and m[0] in (1.0, -1.0):
        return float(m[0])
    return "array" if varying else "scalar"


def _kernel_source(p: int, var_cols: tuple, const_cols: tuple, log_space: bool) -> str:
    """Source of a kernel specialised to one model structure.

    ``var_cols[k][q]`` / ``const_cols[k][q]`` describe design column q of term k (``_column``).
    Every sum over the points keeps its own scalar accumulator, so the point loop vectorises
    with all of them live at once (a loop per matrix entry is bound by one add chain).
    """
    pairs = [(q, t) for q in range(p) for t in range(q, p)]
    terms = [("a", k, cols, "m") for k, cols in enumerate(var_cols)]
    terms += [("b", k, cols, "cm") for k, cols in enumerate(const_cols)]

    def factor(cols, prefix, k, q):  # M_kq at point i
        col = cols[q]
        if col in ("array", "scalar"):
            return f"{prefix}{k}_{q}" + ("[i]" if col == "array" else "")
        return None if col is None else repr(col)

    def times(a, *facs):  # LLVM folds the literal factors
        return " * ".join([a] + [f for f in facs if f != "1.0"])

    def jac(q):
        parts = []
        for a, k, cols, prefix in terms:
            f = factor(cols, prefix, k, q)
            if f is not None:
                parts.append(times(f"{a}{k}", f))
        return " + ".join(parts) if parts else "0.0"

    def second(q, t):  # sum_k a_k M_kq M_kt over the terms using both columns
        out = []
        for a, k, cols, prefix in terms:
            fq, ft = factor(cols, prefix, k, q), factor(cols, prefix, k, t)
            if fq is not None and ft is not None:
                out.append(times(f"{a}{k}", fq, ft))
        return " + ".join(out)

    lines = [
        "def kernel(ev, ec, s, pred, target, w, mv, mc, delta, kneg, kpos, f_old, exact, f, ok, g,"
        " h):",
        "    b = pred.shape[0]",
        "    n = pred.shape[1]",
        "    wrows = w.shape[0]",
    ]
    for k, cols in enumerate(var_cols):
        for q, c in enumerate(cols):
            if c == "array":
                lines.append(f"    m{k}_{q} = mv[{k}, {q}]")
    for k, cols in enumerate(const_cols):
        for q, c in enumerate(cols):
            if c == "scalar":
                lines.append(f"    cm{k}_{q} = mc[{k}, {q}]")
    lines += [
        "    for r in range(b):",
        "        wr = w[r if wrows > 1 else 0]",
        "        pr = pred[r]",
        "        fs = 0.0",
        "        for i in range(n):",
        "            res = pr[i] - target[i]",
        "            d = res if res < delta else delta",
        "            d = d if d > -delta else -delta",
        "            wk = wr[i] * (kneg if res < 0.0 else kpos)",
        "            fs += wk * d * (res - 0.5 * d)",
        "        f[r] = fs",
        "        good = fs < f_old[r] and np.isfinite(fs)",
        "        ok[r] = good",
        "        if not good:",
        "            continue",
        "        sr = s[r]",
    ]
    lines += [f"        e{k} = ev[{k}, r]" for k in range(len(var_cols))]
    lines += [f"        c{k} = ec[{k}, r]" for k in range(len(const_cols))]
    acc = [f"g{q}" for q in range(p)] + [f"h{q}_{t}" for q, t in pairs]
    for exact in (True, False):
        ind = "            "
        lines.append("        if exact[r]:" if exact else "        else:")
        lines += [f"{ind}{a} = 0.0" for a in acc]
        lines.append(f"{ind}for i in range(n):")
        body = [
            "res = pr[i] - target[i]",
            "d = res if res < delta else delta",
            "d = d if d > -delta else -delta",
            "wk = wr[i] * (kneg if res < 0.0 else kpos)",
            "dw = wk * d",
            "inv = 1.0 / sr[i]" if log_space else "inv = 1.0",
        ]
        if exact:
            inside = "wk * (1.0 if abs(res) <= delta else 0.0)"
            body.append(f"cw = {inside} - dw" if log_space else f"cw = {inside}")
        else:
            body.append("cw = wk * delta / max(abs(res), delta)")
        body += [f"a{k} = e{k}[i] * inv" for k in range(len(var_cols))]
        body += [f"b{k} = c{k} * inv" for k in range(len(const_cols))]
        body += [f"j{q} = {jac(q)}" for q in range(p)]
        body += [f"g{q} += dw * j{q}" for q in range(p)]
        body += [f"cj{q} = cw * j{q}" for q in range(p)]
        for q, t in pairs:
            extra = second(q, t) if exact else ""
            body.append(f"h{q}_{t} += cj{q} * j{t}" + (f" + dw * ({extra})" if extra else ""))
        lines += [f"{ind}    {x}" for x in body]
        lines += [f"{ind}g[r, {q}] = g{q}" for q in range(p)]
        for q, t in pairs:
            lines.append(f"{ind}h[r, {q}, {t}] = h{q}_{t}")
            if q != t:
                lines.append(f"{ind}h[r, {t}, {q}] = h{q}_{t}")
    return "\n".join(lines) + "\n"


_KERNELS: dict = {}


def cache_dir() -> Path:
    """Where generated kernels and numba's compiled code for them are kept:
    ``$SPARSEJAX_CACHE_DIR/scaling_kernels``, else ``~/.cache/sparsejax/scaling_kernels``."""
    root = os.environ.get("SPARSEJAX_CACHE_DIR") or Path.home() / ".cache" / "sparsejax"
    return Path(root) / "scaling_kernels"


def _kernel(fops: FusedOps, log_space: bool):
    """The compiled kernel for this model structure.

    The generated source is written to ``cache_dir()`` and imported from there, so numba
    caches its machine code on disk: compiling takes a few seconds once per structure and
    machine, later processes load it in milliseconds. If the directory is not writable the
    kernel is compiled in memory (once per process).
    """
    key = (fops.structure, log_space)
    if key not in _KERNELS:
        body = _kernel_source(*fops.structure, log_space)
        src = _HEADER.format(cache=True) + body
        digest = hashlib.sha1(src.encode()).hexdigest()[:16]
        try:
            _KERNELS[key] = _import_kernel(src, digest)
        except OSError:  # no writable cache: compile in memory, once per process
            ns: dict = {}
            code = _HEADER.format(cache=False) + body
            exec(compile(code, f"<scaling.fused kernel {digest}>", "exec"), ns)
            _KERNELS[key] = ns["kernel"]
    return _KERNELS[key]


_HEADER = (
    "# generated by scaling.fused: one kernel per model structure\n"
    "import numba\n"
    "import numpy as np\n\n\n"
    "@numba.njit(cache={cache}, fastmath=set(" + repr(sorted(_FAST)) + '), error_model="numpy")\n'
)


def _import_kernel(src: str, digest: str):
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"kernel_{digest}.py"
    if not path.exists() or path.read_text() != src:
        tmp = folder / f".kernel_{digest}.{os.getpid()}.tmp"
        tmp.write_text(src)
        os.replace(tmp, path)
    name = f"_sparsejax_kernel_{digest}"
    if name not in sys.modules:  # numba's disk cache re-imports the module by name
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].kernel


def _evaluate_block(fops, pen, theta, w2, f_old, exact):
    b = theta.shape[0]
    n = fops.target.shape[0]
    ev = np.empty((len(fops.var), b, n))
    for k, (cols, mt, off) in enumerate(fops.var):
        np.matmul(theta[:, cols], mt, out=ev[k])
        if off is not None:
            ev[k] += off
        np.exp(ev[k], out=ev[k])
    ec = np.empty((len(fops.const), b))
    for k, (cols, mk, off) in enumerate(fops.const):
        np.exp(theta[:, cols] @ mk + off, out=ec[k])
    s = _sums(ev, ec)
    log_space = pen.space == "log"
    pred = np.log(s) if log_space else s
    p = theta.shape[1]
    f, ok = np.empty(b), np.empty(b, np.bool_)
    g, h = np.zeros((b, p)), np.zeros((b, p, p))
    kernel = _kernel(fops, log_space)
    asym = float(pen.asymmetry)
    kernel(
        ev,
        ec,
        s,
        pred,
        fops.target,
        w2,
        fops.mv,
        fops.mc,
        float(pen.delta),
        2.0 * asym,
        2.0 * (1.0 - asym),
        f_old,
        exact,
        f,
        ok,
        g,
        h,
    )
    return f, ok, g, h


def evaluate_fused(
    fops: FusedOps,
    pen: Penalty,
    theta: np.ndarray,
    weights: np.ndarray | None,
    f_old: np.ndarray | None = None,
    exact_next: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Objective at ``theta`` (B,); gradient and matrix where it beats ``f_old`` (all if None).

    Returns ``(f, ok, g, h)`` like ``scaling.passes.evaluate``: g and h are filled on rows
    ``ok`` (the IRLS matrix, or the exact Hessian on rows with ``exact_next``), zero elsewhere.
    """
    theta = np.ascontiguousarray(theta, np.float64)
    b, n = theta.shape[0], fops.target.shape[0]
    w2 = np.ones((1, n)) if weights is None else np.ascontiguousarray(weights, np.float64)
    f_old = np.full(b, np.inf) if f_old is None else np.ascontiguousarray(f_old, np.float64)
    exact = np.zeros(b, np.bool_) if exact_next is None else np.ascontiguousarray(exact_next)
    fn = functools.partial(_evaluate_block, fops, pen)
    return in_chunks(fn, n, theta, w2, f_old, exact)


@numba.njit(cache=True, error_model="numpy")
def damped_steps(h, g, lam):  # pragma: no cover - compiled
    """Levenberg-Marquardt steps ``(H + lam |diag H|) step = -g`` for every row, by Gaussian
    elimination with partial pivoting; a singular or non-finite system gives a zero step."""
    b, p = g.shape
    out = np.zeros((b, p))
    a = np.empty((p, p))
    x = np.empty(p)
    for r in range(b):
        finite = True
        for i in range(p):
            for j in range(p):
                a[i, j] = h[r, i, j]
            a[i, i] += lam[r] * (abs(h[r, i, i]) + 1e-12)
            x[i] = -g[r, i]
        for i in range(p):
            for j in range(p):
                if not np.isfinite(a[i, j]):
                    finite = False
            if not np.isfinite(x[i]):
                finite = False
        if not finite:
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
        for i in range(p):
            if not np.isfinite(out[r, i]):
                for j in range(p):
                    out[r, j] = 0.0
                break
    return out
