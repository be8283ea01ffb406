"""SPDF: sparse pre-training, then dense (Thangarasa et al. 2023, "SPDF: Sparse Pre-training
and Dense Fine-tuning for Large Language Models").

``spdf(sparse_method, dense_from_step)`` follows ``sparse_method`` until ``dense_from_step``,
where every mask becomes all-true. ``sparsify`` then lets the pruned weights train again:
they resume from exactly 0 (where ``sparsify`` landed them) with zero optimizer moments (it
zeroes the inner state wherever a mask changes). The run's N_avg and FLOP counts follow the
density change, since the training loop reads them from the masks. The two-run form (sparse
pre-training, then dense fine-tuning from a checkpoint) is ``methods.fixed`` / a fresh
optimizer on the loaded weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparsejax.methods.base import Cadence, MaskMethod, check_method, dense_masks, periodic


class UpdateSteps(NamedTuple):
    """A cadence's update steps as a jittable predicate (see :class:`Cadence` ``schedule``)."""

    is_update_step: Callable[[jax.Array], jax.Array]
    end_step: int | None  # no update from this step on (None: updates may come forever)


def spdf(sparse_method: MaskMethod, dense_from_step: int) -> MaskMethod:
    """``sparse_method``'s masks for steps ``< dense_from_step``, all-true from it on.

    >>> # methods.spdf(methods.static(0.75), dense_from_step=7_500)
    """
    check_method(sparse_method)
    if sparse_method.straight_through:
        raise ValueError("spdf: sparse_method must keep hard masks (not straight-through)")
    if isinstance(dense_from_step, bool) or not isinstance(dense_from_step, int) or (
            dense_from_step < 1):
        raise ValueError(f"dense_from_step must be an int >= 1, got {dense_from_step!r}")
    sparse_cadence = sparse_method.cadence

    def init(params, key, prunable):
        return sparse_method.init(params, key, prunable)

    def update(params, grads, masks, state, step, key, prunable):
        def sparse(_):
            return sparse_method.update(params, grads, masks, state, step, key, prunable)

        def dense(_):
            return dense_masks(params, prunable), state

        return jax.lax.cond(step >= dense_from_step, dense, sparse, None)

    def target(step):
        sparse_target = jnp.asarray(sparse_method.target(step), jnp.float32)
        return jnp.where(jnp.asarray(step) >= dense_from_step, 0.0, sparse_target)

    if sparse_cadence.fixed:
        cadence = periodic(1, dense_from_step, dense_from_step + 1)
    else:
        def is_update_step(step):
            step = jnp.asarray(step)
            before = sparse_cadence.is_update_step(step) & (step < dense_from_step)
            return before | (step == dense_from_step)

        cadence = Cadence(1, 0, dense_from_step + 1,
                          UpdateSteps(is_update_step, dense_from_step + 1))
    return MaskMethod(init, update, cadence, target=target,
                      name=f"spdf/{sparse_method.name}/dense@{dense_from_step}")
