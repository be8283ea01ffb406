"""Static sparsity: masks chosen once and kept for the whole run.

Random pruning at initialization with ERK allocation (Evci et al. 2020, "Rigging the Lottery";
Liu et al. 2022, "The Unreasonable Effectiveness of Random Pruning"), the sparse phase of SPDF
(Thangarasa et al. 2023). Scores that need no gradient (``random``, ``magnitude``) are applied in
``init``; ``saliency`` (SNIP, Lee et al. 2019) needs a gradient and is applied at step 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from sparsejax import checks
from sparsejax.methods.base import (
    MaskMethod,
    constant_target,
    dense_masks,
    needs_grads,
    never,
    periodic,
    resolve_score,
    score_name,
)
from sparsejax.methods.gradual import Selection, check_allocation, select


def static(
    sparsity: float,
    *,
    score: str | Callable[..., Any] = "random",
    allocation: str | Selection = "erk",
    power_scale: float = 1.0,
) -> MaskMethod:
    """Fixed masks at ``sparsity`` (exact counts) from ``score`` and ``allocation``.

    Scores that need no gradient (``"random"``, ``"magnitude"``) are applied in ``init``, so
    ``sparsejax.prune(params, opt_state)`` gives sparse weights before the first forward pass.
    A score that reads gradients (``"saliency"``: SNIP, or any other callable) is applied at
    step 0 from that step's gradient: SNIP scores connections on a dense forward/backward pass
    by definition; every weight update is sparse from step 0 on.
    """
    checks.sparsity("sparsity", sparsity)
    score_fn = resolve_score(score)
    check_allocation(allocation)
    target = jnp.float32(sparsity)

    def compute(params, grads, key, prunable):
        sc = score_fn(params, grads, key)
        return select(sc, target, params, prunable, allocation=allocation, power_scale=power_scale)

    at_step_zero = needs_grads(score)

    def init(params, key, prunable):
        if at_step_zero:  # SNIP-style: wait for the first gradient (step 0)
            return dense_masks(params, prunable), ()
        return compute(params, None, key, prunable), ()

    def update(params, grads, masks, state, step, key, prunable):
        del masks, step
        return compute(params, grads, key, prunable), state

    alloc_name = allocation if isinstance(allocation, str) else "custom"
    return MaskMethod(
        init, update, periodic(1, 0, 1) if at_step_zero else never,
        target=constant_target(sparsity), name=f"static/{score_name(score)}/{alloc_name}",
    )
