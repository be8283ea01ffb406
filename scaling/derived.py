"""Bootstrap intervals for what users plan with: compute-optimal exponents, N_opt and D_opt at a
budget, and the sparse plan (issue 25).

Each bootstrap replicate of a Chinchilla fit (``scaling.uncertainty.bootstrap``) is a law; the
derived quantity is computed from every replicate and its percentile interval reported, as
Besiroglu et al. 2024 report one for the exponent ``a``. With ``C = 6 N D`` (Hoffmann et al.
2022, eq. 4):
``a = beta / (alpha + beta)``, ``b = alpha / (alpha + beta)``,
``N_opt = G (C/6)^a``, ``D_opt = (C/6)^b / G``, ``G = (alpha A / (beta B))^(1 / (alpha + beta))``
(``scaling.laws.ChinchillaLaw.compute_optimal``); the sparse plan is ``scaling.plan.plan_sparse``
(Jin et al. 2025: the dense size to build is ``N_opt / rho``). A replicate whose law has no
compute-optimal split (an exponent or a coefficient at 0) is left out and counted.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from scaling.laws import ChinchillaLaw
from scaling.plan import plan_sparse

__all__ = ["Derived", "Interval", "derived_intervals", "format_derived"]


class Interval(NamedTuple):
    estimate: float  # from the full-data fit
    low: float
    high: float


class Derived(NamedTuple):
    intervals: dict[str, Interval]  # quantity -> interval ("a", "b", "N_opt", ...)
    level: float
    n_used: int  # replicates with a compute-optimal split
    n_boot: int
    flops: float | None
    final_sparsity: float | None


def _quantities(law: ChinchillaLaw, flops, final_sparsity, plan_kwargs) -> dict[str, float]:
    a, b = law.exponents
    out = {"a": a, "b": b}
    if flops is not None:
        opt = law.compute_optimal(flops)
        out.update(N_opt=float(opt.N), D_opt=float(opt.D), loss_opt=float(opt.loss))
        if final_sparsity is not None:
            plan = plan_sparse(law, flops, final_sparsity, force=True, **plan_kwargs)
            out.update(plan_n_dense=plan.n_dense, plan_n_final=plan.n_final,
                       plan_n_avg=plan.n_avg, plan_tokens=plan.tokens, plan_loss=plan.loss)
    return out


def derived_intervals(
    fit,
    boot,
    *,
    flops: float | None = None,
    final_sparsity: float | None = None,
    level: float = 0.95,
    **plan_kwargs,
) -> Derived:
    """Percentile intervals of the compute-optimal exponents ``a, b``; with ``flops`` also of
    ``N_opt, D_opt`` and the predicted loss there; with ``final_sparsity`` too, of the sparse
    plan (``plan_n_dense``, ``plan_n_final``, ``plan_n_avg``, ``plan_tokens``, ``plan_loss``;
    ``plan_kwargs`` go to ``plan_sparse``: ``start``, ``end``, ``kind``, ``by``, ``power``).
    ``fit`` is a ``ChinchillaFit`` and ``boot`` its ``Bootstrap``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    if final_sparsity is not None and flops is None:
        raise ValueError("a sparse plan needs flops (the training budget)")
    if flops is not None and not (np.isfinite(flops) and flops > 0):
        raise ValueError(f"flops must be finite and > 0; got {flops}")
    names = ("E", "A", "B", "alpha", "beta")
    if tuple(boot.names) != names:
        raise ValueError(f"derived intervals need a Chinchilla-law bootstrap; got {boot.names}")
    est = _quantities(fit.law, flops, final_sparsity, plan_kwargs)
    rows = []
    for sample in boot.samples:
        try:
            law = ChinchillaLaw(**dict(zip(names, (float(v) for v in sample), strict=True)))
            rows.append(_quantities(law, flops, final_sparsity, plan_kwargs))
        except ValueError:  # no compute-optimal split (an exponent or coefficient at 0)
            continue
    if len(rows) < 2:
        raise ValueError(f"only {len(rows)} bootstrap replicates have a compute-optimal split")
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    intervals = {}
    for key, value in est.items():
        low, high = np.percentile([r[key] for r in rows], q)
        intervals[key] = Interval(float(value), float(low), float(high))
    return Derived(intervals, level, len(rows), int(boot.samples.shape[0]), flops,
                   final_sparsity)


LABELS = {
    "a": "a (N_opt ~ C^a)",
    "b": "b (D_opt ~ C^b)",
    "N_opt": "N_opt",
    "D_opt": "D_opt (tokens)",
    "loss_opt": "loss at the optimum",
    "plan_n_dense": "plan: dense size",
    "plan_n_final": "plan: final non-zero",
    "plan_n_avg": "plan: N_avg",
    "plan_tokens": "plan: tokens",
    "plan_loss": "plan: loss",
}


def format_derived(d: Derived) -> str:
    """The intervals as a text table."""
    head = f"derived quantities ({100 * d.level:g}% bootstrap intervals, {d.n_used}/{d.n_boot} " \
           "replicates"
    if d.flops is not None:
        head += f"; C = {d.flops:.4g} FLOPs"
    if d.final_sparsity is not None:
        head += f", final sparsity {d.final_sparsity:g}"
    rows = [head + ")"]
    for key, iv in d.intervals.items():
        rows.append(f"  {LABELS.get(key, key):<22} {iv.estimate:>12.5g}  "
                    f"[{iv.low:.5g}, {iv.high:.5g}]")
    return "\n".join(rows)
