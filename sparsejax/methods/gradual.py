"""Gradual pruning: any sparsity schedule + score + allocation (layer-wise or global).

Zhu & Gupta 2017, "To prune, or not to prune" (polynomial schedule, magnitude score); Jin et
al. 2025, "The Journey Matters" (geometric schedule in a 25%->75%-of-compute window, global
magnitude). Pruned weights never regrow: already-pruned entries rank below every active one.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from sparsejax import allocation as allocation_lib
from sparsejax import masks as masks_lib
from sparsejax import prunable as prunable_lib
from sparsejax import scores as scores_lib
from sparsejax.methods.base import MaskMethod, always, dense_masks, restrict_to_active
from sparsejax.schedules import Schedule

ALLOCATIONS = ("uniform", "erk", "er", "global")


def check_allocation(allocation: str) -> None:
    """Raise ``ValueError`` for an unknown allocation name."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")


def select(
    scores: Any,
    sparsity: jax.Array,
    params: Any,
    prunable: prunable_lib.Predicate,
    *,
    allocation: str,
    power_scale: float = 1.0,
    normalize: str | None = None,
) -> Any:
    """Exact masks at total ``sparsity`` from ``scores`` with the named allocation."""
    tree = prunable_lib.prunable_tree(params, prunable)
    if allocation == "global":
        return masks_lib.global_topk(scores, sparsity, tree, normalize=normalize)
    alloc = allocation_lib.allocator(allocation, params, prunable=prunable, power_scale=power_scale)
    return masks_lib.layerwise(scores, alloc(sparsity), tree)


def gradual(
    schedule: Schedule,
    *,
    score: str = "magnitude",
    allocation: str = "uniform",
    power_scale: float = 1.0,
    normalize: str | None = None,
) -> MaskMethod:
    """Prune to ``schedule(step)`` at the schedule's update steps.

    Args:
      schedule: a :class:`sparsejax.schedules.Schedule` (``constant``, ``polynomial``,
        ``geometric``, ``window``, ...); it also says on which steps masks are recomputed.
      score: ``"magnitude"`` (|w|), ``"saliency"`` (|w g|) or ``"random"``.
      allocation: ``"uniform"``, ``"erk"``, ``"er"`` (per-leaf sparsities) or ``"global"``
        (one threshold across all prunable leaves).
      power_scale: ERK/ER exponent.
      normalize: per-leaf score normalization for ``"global"`` (see ``masks.global_topk``).
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a sparsejax.schedules.Schedule, got {type(schedule)}")
    score_fn = scores_lib.get(score)
    check_allocation(allocation)
    masks_lib.check_normalize(normalize)
    if normalize is not None and allocation != "global":
        raise ValueError("normalize applies only to allocation='global'")

    def init(params, key, prunable):
        del key
        return dense_masks(params, prunable), ()

    def update(params, grads, masks, state, step, key, prunable):
        tree = prunable_lib.prunable_tree(params, prunable)
        sc = restrict_to_active(score_fn(params, grads, key), masks, tree)
        new = select(
            sc, schedule(step), params, prunable,
            allocation=allocation, power_scale=power_scale, normalize=normalize,
        )
        return new, state

    # constant(s, update_every=1) updates at every step: the `always` sentinel skips the cond.
    every_step = schedule.end_step is None and schedule.update_every == 1
    every_step = every_step and schedule.begin_step == 0
    every_step = every_step and bool(np.all(schedule.is_update_step(np.arange(64))))
    is_update_step = always if every_step else schedule.is_update_step
    return MaskMethod(init, update, is_update_step, name=f"gradual/{score}/{allocation}")
