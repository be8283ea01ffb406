"""Static sparsity: masks chosen once and kept for the whole run.

Random pruning at initialization with ERK allocation (Evci et al. 2020, "Rigging the Lottery";
Liu et al. 2022, "The Unreasonable Effectiveness of Random Pruning"), the sparse phase of SPDF
(Thangarasa et al. 2023). Scores that need no gradient (``random``, ``magnitude``) are applied in
``init``; ``saliency`` (SNIP, Lee et al. 2019) needs a gradient and is applied at step 0.
"""

from __future__ import annotations

import jax.numpy as jnp

from sparsejax import checks
from sparsejax import scores as scores_lib
from sparsejax.methods.base import MaskMethod, dense_masks, never
from sparsejax.methods.gradual import check_allocation, select

_NEEDS_GRADS = ("saliency",)


def static(
    sparsity: float,
    *,
    score: str = "random",
    allocation: str = "erk",
    power_scale: float = 1.0,
) -> MaskMethod:
    """Fixed masks at ``sparsity`` (exact counts) from ``score`` and ``allocation``."""
    checks.sparsity("sparsity", sparsity)
    score_fn = scores_lib.get(score)
    check_allocation(allocation)
    target = jnp.float32(sparsity)

    def compute(params, grads, key, prunable):
        sc = score_fn(params, grads, key)
        return select(sc, target, params, prunable, allocation=allocation, power_scale=power_scale)

    needs_grads = score in _NEEDS_GRADS

    def init(params, key, prunable):
        if needs_grads:  # SNIP-style: wait for the first gradient (step 0)
            return dense_masks(params, prunable), ()
        return compute(params, None, key, prunable), ()

    def update(params, grads, masks, state, step, key, prunable):
        del masks, step
        return compute(params, grads, key, prunable), state

    def at_step_zero(step):
        return jnp.asarray(step) == 0

    return MaskMethod(
        init, update, at_step_zero if needs_grads else never, name=f"static/{score}/{allocation}"
    )
