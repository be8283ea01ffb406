"""The ``MaskMethod`` protocol: how a pruning method plugs into :func:`sparsejax.sparsify`.

A method is a NamedTuple of pure functions (optax style, DESIGN.md "Optimizer side"):

- ``init(params, key, prunable) -> (masks, state)``
- ``update(params, grads, masks, state, step, key, prunable) -> (masks, state)``, called only
  on steps where ``is_update_step(step)`` is true (under ``lax.cond``);
- ``is_update_step(step) -> bool scalar`` (jittable). Two sentinels let ``sparsify`` skip the
  ``cond``: :func:`never` (masks fixed after ``init``) and :func:`always` (every step).

``prunable`` is the predicate ``(path, leaf) -> bool`` resolved by ``sparsify``. Masks are
pytrees shaped like params: prunable leaves hold bool arrays, others a scalar ``True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax import prunable as prunable_lib

Params = Any
Masks = Any


class MaskMethod(NamedTuple):
    """Pure functions that compute masks; see the module docstring for the signatures."""

    init: Callable[..., tuple[Masks, Any]]
    update: Callable[..., tuple[Masks, Any]]
    is_update_step: Callable[[jax.Array], jax.Array]
    name: str = "custom"


def dense_masks(params: Params, prunable: prunable_lib.Predicate) -> Masks:
    """All-true masks: bool arrays on prunable leaves, scalar ``True`` elsewhere."""
    tree = prunable_lib.prunable_tree(params, prunable)
    return jax.tree_util.tree_map(
        lambda p, pr: jnp.ones(p.shape, jnp.bool_) if pr else jnp.bool_(True), params, tree
    )


def restrict_to_active(scores: Any, masks: Masks, prunable_tree: Any) -> Any:
    """Give already-pruned entries the lowest priority (-1 < any score >= 0): no regrowth."""
    return jax.tree_util.tree_map(
        lambda s, m, pr: jnp.where(m, s, -1.0) if pr else s, scores, masks, prunable_tree
    )


def always(step: jax.Array) -> jax.Array:
    """``is_update_step`` of a method that recomputes its masks at every step (no ``cond``)."""
    return jnp.asarray(step) >= 0  # the step count never goes negative


def never(step: jax.Array) -> jax.Array:
    """``is_update_step`` of a method whose masks are fixed after ``init``."""
    return jnp.zeros((), jnp.bool_) & (jnp.asarray(step) < 0)
