"""Gradual pruning: any sparsity schedule + score + allocation (layer-wise or global).

Zhu & Gupta 2017, "To prune, or not to prune" (polynomial schedule, magnitude score); Jin et
al. 2025, "The Journey Matters" (geometric schedule in a 25%->75%-of-compute window, global
magnitude). Pruned weights never regrow: already-pruned entries rank below every active one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from sparsejax import allocation as allocation_lib
from sparsejax import masks as masks_lib
from sparsejax import prunable as prunable_lib
from sparsejax.methods.base import (
    MaskMethod,
    always,
    dense_masks,
    following,
    resolve_score,
    restrict_to_active,
    score_name,
)
from sparsejax.schedules import Schedule

ALLOCATIONS = ("uniform", "erk", "er", "global")

Selection = Callable[[Any, jax.Array, Any], Any]  # (scores, sparsity, prunable_tree) -> masks


def check_allocation(allocation: str | Selection) -> None:
    """Raise ``ValueError`` for an unknown allocation name (callables are selections)."""
    if callable(allocation):
        return
    if allocation not in ALLOCATIONS:
        raise ValueError(
            f"allocation must be one of {ALLOCATIONS} or a callable "
            f"(scores, sparsity, prunable_tree) -> masks, got {allocation!r}"
        )


def select(
    scores: Any,
    sparsity: jax.Array,
    params: Any,
    prunable: prunable_lib.Predicate,
    *,
    allocation: str | Selection,
    power_scale: float = 1.0,
    normalize: str | None = None,
) -> Any:
    """Exact masks at total ``sparsity`` from ``scores`` with the named allocation, or with a
    selection callable ``(scores, sparsity, prunable_tree) -> masks`` (e.g.
    ``functools.partial(masks.global_topk, normalize="l2")``)."""
    tree = prunable_lib.prunable_tree(params, prunable)
    if callable(allocation):
        return allocation(scores, sparsity, tree)
    if allocation == "global":
        return masks_lib.global_topk(scores, sparsity, tree, normalize=normalize)
    alloc = allocation_lib.allocator(allocation, params, prunable=prunable, power_scale=power_scale)
    return masks_lib.layerwise(scores, alloc(sparsity), tree)


def gradual(
    schedule: Schedule,
    *,
    score: str | Callable[..., Any] = "magnitude",
    allocation: str | Selection = "uniform",
    power_scale: float = 1.0,
    normalize: str | None = None,
) -> MaskMethod:
    """Prune to ``schedule(step)`` at the schedule's update steps.

    Args:
      schedule: a :class:`sparsejax.schedules.Schedule` (``constant``, ``polynomial``,
        ``geometric``, ``window``, ...); it also declares on which steps masks are recomputed.
      score: ``"magnitude"`` (|w|), ``"saliency"`` (|w g|), ``"random"``, or a callable
        ``score(params, grads, key) -> pytree`` such as ``scores.gblm_score(act_norms)``.
      allocation: ``"uniform"``, ``"erk"``, ``"er"`` (per-leaf sparsities), ``"global"``
        (one threshold across all prunable leaves), or a selection callable
        ``(scores, sparsity, prunable_tree) -> masks``.
      power_scale: ERK/ER exponent.
      normalize: per-leaf score normalization for ``"global"`` (see ``masks.global_topk``).
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a sparsejax.schedules.Schedule, got {type(schedule)}")
    score_fn = resolve_score(score)
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

    cadence = following(schedule)
    if cadence.every_step:  # constant(s) at every step: declared by the schedule's fields
        cadence = always
    alloc_name = allocation if isinstance(allocation, str) else "custom"
    return MaskMethod(init, update, cadence, target=schedule.fn,
                      name=f"gradual/{score_name(score)}/{alloc_name}")
