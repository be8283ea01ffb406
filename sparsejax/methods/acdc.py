"""AC/DC: alternating compressed / decompressed training (Peste et al. 2021, "AC/DC:
Alternating Compressed/DeCompressed Training of Deep Neural Networks").

Training starts with a dense warm-up, then alternates *sparse* (compressed) phases of
``sparse_steps`` and *dense* (decompressed) phases of ``dense_steps``, and ends with one long
sparse phase, the fine-tune, from ``finetune_from`` to the end. At the first step of every
sparse phase the masks are recomputed by magnitude (top-k of ``|W|`` at ``sparsity``, exact
counts) and stay fixed through the phase (the pruned weights land at 0); at the first step of
every dense phase every weight trains again, the pruned ones from 0 (``sparsify`` also zeroes
their optimizer moments, as it does wherever a mask changes).

Step ``t`` is sparse when ``t >= finetune_from``, or when ``t >= warmup_steps`` and
``(t - warmup_steps) mod (sparse_steps + dense_steps) < sparse_steps``; dense otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import checks
from sparsejax.methods.base import Cadence, MaskMethod, dense_masks, resolve_score, score_name
from sparsejax.methods.gradual import Selection, check_allocation, select
from sparsejax.methods.spdf import UpdateSteps


def acdc_is_sparse(step: jax.Array, *, warmup_steps: int, sparse_steps: int, dense_steps: int,
                   finetune_from: int | None) -> jax.Array:
    """Whether ``step`` is in a sparse (compressed) phase (module docstring), jittable."""
    step = jnp.asarray(step)
    cycle = (step - warmup_steps) % (sparse_steps + dense_steps)
    sparse = (step >= warmup_steps) & (cycle < sparse_steps)
    return sparse if finetune_from is None else sparse | (step >= finetune_from)


def acdc(
    sparsity: float,
    *,
    dense_steps: int,
    sparse_steps: int,
    warmup_steps: int | None = None,
    finetune_from: int | None = None,
    score: str | Callable[..., Any] = "magnitude",
    allocation: str | Selection = "uniform",
    power_scale: float = 1.0,
    normalize: str | None = None,
) -> MaskMethod:
    """AC/DC (module docstring).

    Args:
      sparsity: the sparsity of every sparse phase, in ``[0, 1)``.
      dense_steps, sparse_steps: the length of each dense / sparse phase (ints >= 1).
      warmup_steps: the dense warm-up (default ``dense_steps``; >= 1: AC/DC starts dense).
      finetune_from: the step the final sparse phase starts, kept to the end (``None``: the
        phases alternate forever). A sparse phase running at that step continues, masks kept.
      score: ``"magnitude"`` (the paper's) or another score of :func:`sparsejax.methods.gradual`.
      allocation, power_scale, normalize: as :func:`sparsejax.methods.gradual`.

    >>> # methods.acdc(0.9, dense_steps=500, sparse_steps=500, warmup_steps=1000,
    >>> #              finetune_from=9000)
    """
    checks.sparsity("sparsity", sparsity)
    checks.positive_ints(dense_steps=dense_steps, sparse_steps=sparse_steps)
    warmup = dense_steps if warmup_steps is None else checks.integer("warmup_steps",
                                                                      warmup_steps, 1)
    if finetune_from is not None:
        checks.integer("finetune_from", finetune_from, warmup)
    score_fn = resolve_score(score)
    check_allocation(allocation)
    if normalize is not None and allocation != "global":
        raise ValueError("normalize applies only to allocation='global'")
    target = jnp.float32(sparsity)

    def is_sparse(step):
        return acdc_is_sparse(step, warmup_steps=warmup, sparse_steps=sparse_steps,
                              dense_steps=dense_steps, finetune_from=finetune_from)

    def is_update_step(step):  # the first step of every phase after the warm-up
        step = jnp.asarray(step)
        return (step >= 1) & (is_sparse(step) != is_sparse(step - 1))

    def init(params, key, prunable):
        del key
        return dense_masks(params, prunable), ()

    def update(params, grads, masks, state, step, key, prunable):
        del masks

        def sparse(_):
            return select(score_fn(params, grads, key), target, params, prunable,
                          allocation=allocation, power_scale=power_scale, normalize=normalize)

        return jax.lax.cond(is_sparse(step), sparse, lambda _: dense_masks(params, prunable),
                            None), state

    def target_fn(step):
        return jnp.where(is_sparse(step), target, 0.0).astype(jnp.float32)

    end = None if finetune_from is None else finetune_from + 1
    # begin_step 1: step 0 is in the warm-up, and the update is not every step (sparsify
    # then asks is_update_step before calling it)
    cadence = Cadence(1, 1, end, UpdateSteps(is_update_step, end))
    return MaskMethod(init, update, cadence, target=target_fn,
                      name=f"acdc/{score_name(score)}/{sparse_steps}s{dense_steps}d")
