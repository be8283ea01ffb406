"""Straight-through unstructured sparsity: dense weights, unstructured-sparse forward passes.

The forward pass sees ``W * E`` (``sparsejax.forward_params``) with ``E`` the exact top-k mask
of the scores at the target sparsity, recomputed every step; the backward pass is the identity
through the mask, so every weight, kept or pruned, receives the gradient of the loss with
respect to its forward value and keeps training (the straight-through estimator, Bengio et
al. 2013, "Estimating or Propagating Gradients Through Stochastic Neurons for Conditional
Computation"; applied to pruning masks by Zhou et al. 2021, "Learning N:M Fine-grained
Structured Sparse Neural Networks From Scratch", and, unstructured, by JaxPruner's
``SteMagnitudePruning`` / ``SteRandomPruning``, Lee et al. 2023, "JaxPruner: A concise library
for sparsity research"). ``methods.ste(n, m)`` is the N:M member of the family.

``score="magnitude"`` ranks ``|W|`` of the current dense weights at every step (pruned weights
can come back when they grow). ``score="random"`` draws one random score per weight at
``init`` and keeps it (JaxPruner's random pruner also draws from a fixed seed), so the random
mask is fixed while the pruned weights still receive straight-through gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax import checks
from sparsejax import scores as scores_lib
from sparsejax.methods.base import MaskMethod, dense_masks, periodic
from sparsejax.methods.gradual import Selection, check_allocation, select

SCORES = ("magnitude", "random")


def ste_unstructured(
    sparsity: float,
    *,
    score: str = "magnitude",
    allocation: str | Selection = "uniform",
    power_scale: float = 1.0,
    normalize: str | None = None,
    dense_steps: int = 0,
    hard_from: int | None = None,
) -> MaskMethod:
    """Straight-through unstructured masks at ``sparsity`` (exact counts), recomputed every
    step (module docstring).

    Args:
      sparsity: the fraction of prunable weights masked in the forward pass, in ``[0, 1)``.
      score: ``"magnitude"`` (``|W|`` each step) or ``"random"`` (one draw at ``init``).
      allocation: ``"uniform"``, ``"erk"``, ``"er"``, ``"global"`` or a selection callable
        (as :func:`sparsejax.methods.gradual`).
      power_scale: ERK/ER exponent. normalize: per-leaf normalization for ``"global"``.
      dense_steps: dense warm-up (all-true masks for steps ``< dense_steps``).
      hard_from: from this step on the masks are hard: pruned weights land at 0 and train no
        more (``None``: straight-through to the end).

    Train on ``sparsejax.forward_params(params, opt_state)``; the training loop does.
    """
    checks.sparsity("sparsity", sparsity)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES} for ste_unstructured, got {score!r}")
    check_allocation(allocation)
    if normalize is not None and allocation != "global":
        raise ValueError("normalize applies only to allocation='global'")
    checks.integer("dense_steps", dense_steps, 0)
    if hard_from is not None:
        checks.integer("hard_from", hard_from, dense_steps + 1)
    target = jnp.float32(sparsity)

    def masks_of(params, state, prunable):
        sc = (scores_lib.magnitude(params) if score == "magnitude"
              else scores_lib.random(params, key=state))
        return select(sc, target, params, prunable, allocation=allocation,
                      power_scale=power_scale, normalize=normalize)

    def init(params, key, prunable):
        state = key  # the random score's fixed key (unused by magnitude)
        if dense_steps > 0:
            return dense_masks(params, prunable), state
        return masks_of(params, state, prunable), state  # sparse forward from step 0

    def update(params, grads, masks, state, step, key, prunable):
        del grads, masks, key
        return jax.lax.cond(step < dense_steps, lambda p: dense_masks(p, prunable),
                            lambda p: masks_of(p, state, prunable), params), state

    def target_fn(step):
        return jnp.where(jnp.asarray(step) < dense_steps, 0.0, target).astype(jnp.float32)

    alloc_name = allocation if isinstance(allocation, str) else "custom"
    return MaskMethod(
        init, update, periodic(1, 0, hard_from), target=target_fn,
        name=f"ste_unstructured/{score}/{alloc_name}", straight_through=True,
        hard_from=hard_from,
    )
