"""Structured selection shared by :func:`~sparsejax.methods.block` and
:func:`~sparsejax.methods.channels`: prune whole *units* (tiles, output channels) of a leaf.

A :class:`Plan` (computed from the params' shapes and paths, in plain Python) says which
leaves hold competing units, how a leaf's element scores pool into one score per unit
(``pool``), and how the kept units become the masks of every leaf (``expand``; a unit may span
several leaves, e.g. a channel and the next layer's matching input row). Selection is exact:
every leaf keeps ``u - round(s u)`` of its ``u`` units (``"uniform"``), or one threshold keeps
``U - round(s U)`` of all ``U`` units (``"global"``); ties keep the lower index
(:mod:`sparsejax.masks`).

With a schedule the masks follow it (gradual pruning, Zhu & Gupta 2017, "To prune, or not to
prune") and a pruned unit never returns: it ranks below every active one. Without, the masks
are chosen once, at ``init`` (scores that need no gradient) or at step 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax import checks
from sparsejax import masks as masks_lib
from sparsejax import prunable as prunable_lib
from sparsejax.methods.base import (
    MaskMethod,
    constant_target,
    dense_masks,
    following,
    needs_grads,
    never,
    periodic,
    resolve_score,
)
from sparsejax.paths import path_str
from sparsejax.schedules import Schedule

ALLOCATIONS = ("uniform", "global")


class Plan(NamedTuple):
    """Units of a params tree (module docstring).

    ``pool[name](leaf_scores) -> unit scores`` for each leaf whose units compete (keyed by
    ``path_str``); ``expand(kept, params, prunable_tree) -> masks`` turns ``{name: kept units
    (bool)}`` into masks shaped like params (leaves outside the plan all-true).
    """

    pool: dict[str, Callable[[jax.Array], jax.Array]]
    expand: Callable[[dict[str, jax.Array], Any, Any], Any]


def _leaves_by_name(tree: Any) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def select_units(plan: Plan, scores: Any, masks: Any | None, sparsity: jax.Array,
                 allocation: str) -> dict[str, jax.Array]:
    """Kept units of every leaf in ``plan`` at ``sparsity``; with ``masks``, units whose
    entries are all masked already rank last (-1 below every pooled score >= 0)."""
    by_name = _leaves_by_name(scores)
    old = _leaves_by_name(masks) if masks is not None else {}
    unit_scores = {}
    for name, pool in plan.pool.items():
        u = pool(by_name[name].astype(jnp.float32))
        if name in old:
            active = pool(old[name].astype(jnp.float32)) > 0
            u = jnp.where(active, u, -1.0)
        unit_scores[name] = u
    if not unit_scores:
        return {}
    flags = {n: True for n in unit_scores}
    if allocation == "global":
        return masks_lib.global_topk(unit_scores, sparsity, flags)
    return masks_lib.layerwise(unit_scores, {n: sparsity for n in unit_scores}, flags)


def check_allocation(allocation: str) -> None:
    """``ValueError`` unless ``allocation`` is ``"uniform"`` or ``"global"``."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")


def structured_method(
    make_plan: Callable[[Any, prunable_lib.Predicate], Plan],
    sparsity: float,
    *,
    score: str | Callable[..., Any],
    schedule: Schedule | None,
    allocation: str,
    name: str,
) -> MaskMethod:
    """A :class:`MaskMethod` pruning the units of ``make_plan(params, prunable)`` to
    ``sparsity`` (static) or along ``schedule`` (whose final sparsity must be ``sparsity``)."""
    checks.sparsity("sparsity", sparsity)
    score_fn = resolve_score(score)
    check_allocation(allocation)
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be None or a sparsejax.schedules.Schedule, got "
                             f"{type(schedule)}")
        if abs(schedule.final_sparsity - sparsity) > 1e-9:
            raise ValueError(f"schedule's final sparsity ({schedule.final_sparsity}) must equal "
                             f"sparsity ({sparsity})")

    def compute(params, grads, key, masks, target, prunable):
        plan = make_plan(params, prunable)
        sc = score_fn(params, grads, key)
        kept = select_units(plan, sc, masks, target, allocation)
        return plan.expand(kept, params, prunable_lib.prunable_tree(params, prunable))

    if schedule is not None:
        def init(params, key, prunable):
            del key
            make_plan(params, prunable)  # shape errors at init, naming the leaf
            return dense_masks(params, prunable), ()

        def update(params, grads, masks, state, step, key, prunable):
            return compute(params, grads, key, masks, schedule(step), prunable), state

        return MaskMethod(init, update, following(schedule), target=schedule.fn, name=name)

    at_step_zero = needs_grads(score)
    target = jnp.float32(sparsity)

    def init_static(params, key, prunable):
        if at_step_zero:
            make_plan(params, prunable)
            return dense_masks(params, prunable), ()
        return compute(params, None, key, None, target, prunable), ()

    def update_static(params, grads, masks, state, step, key, prunable):
        del masks, step
        return compute(params, grads, key, None, target, prunable), state

    return MaskMethod(init_static, update_static, periodic(1, 0, 1) if at_step_zero else never,
                      target=constant_target(sparsity), name=name)
