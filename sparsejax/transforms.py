"""``sparsify``: wrap any Optax transformation so that it trains a sparse network.

DESIGN.md, "Optimizer side". One update:

1. on mask-update steps (``lax.cond``), compute new masks with the method (it may read
   params and grads), and zero the inner optimizer's state (Adam moments, accumulated
   gradients, ...) at every position whose mask changed, so dropped and regrown weights
   carry no stale moments;
2. mask the gradients, so pruned weights accumulate no moments;
3. run ``inner``;
4. return ``where(mask, updates, -params)`` so that ``optax.apply_updates`` lands pruned
   weights at exactly 0: after every step ``params == params * mask``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax import prunable as prunable_lib
from sparsejax.methods.base import MaskMethod, always, never


class SparsifyState(NamedTuple):
    """State of :func:`sparsify`."""

    count: jax.Array  # shape=(), int32: number of updates applied so far
    masks: Any  # pytree like params: bool arrays on prunable leaves, scalar True elsewhere
    key: jax.Array  # shape=(2,), uint32: base PRNG key; step t uses fold_in(key, t)
    method_state: Any  # the mask method's own state
    inner_state: Any  # the wrapped transformation's state


def _map_param_shaped(state: Any, params: Any, fn) -> Any:
    """Apply ``fn(state_leaf, param_leaf_index)`` to every params-shaped subtree of ``state``.

    A subtree counts as params-shaped when its tree structure equals that of ``params`` and
    its leaves have the params' shapes (Adam's ``mu``/``nu``, MultiSteps' accumulators, ...).
    """
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    shapes = [jnp.shape(x) for x in p_leaves]

    def matches(node) -> bool:
        try:
            leaves, treedef = jax.tree_util.tree_flatten(node)
        except Exception:  # noqa: BLE001 - not a pytree we can inspect
            return False
        return treedef == p_def and [jnp.shape(x) for x in leaves] == shapes

    def apply(node):
        if not matches(node):
            return node
        return p_def.unflatten([fn(x, i) for i, x in enumerate(jax.tree_util.tree_leaves(node))])

    return jax.tree_util.tree_map(apply, state, is_leaf=matches)


def sparsify(
    inner: optax.GradientTransformation,
    method: MaskMethod,
    *,
    prunable: prunable_lib.Predicate | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Train only the unmasked weights of ``params`` with ``inner``; masks come from ``method``.

    Args:
      inner: any Optax transformation (``optax.adamw(...)``, a chain, inject_hyperparams...).
      method: a :class:`sparsejax.methods.MaskMethod` (``gradual``, ``static``, ``nm``).
      prunable: predicate ``(path, leaf) -> bool`` choosing prunable leaves (default:
        ``ndim >= 2`` and no ``embed/norm/bias/pos`` in the path).
      seed: seed of the PRNG key used by random scores (step t uses ``fold_in(key, t)``).

    ``update`` requires ``params``. Masks are in the state: see :func:`masks_of`.
    """
    if not isinstance(method, MaskMethod):
        raise ValueError(f"method must be a sparsejax MaskMethod, got {type(method)!r}")
    if not hasattr(inner, "init") or not hasattr(inner, "update"):
        raise ValueError(f"inner must be an optax GradientTransformation, got {type(inner)!r}")
    pred = prunable_lib.resolve(prunable)
    inner = optax.with_extra_args_support(inner)
    fixed = method.is_update_step is never
    every_step = method.is_update_step is always
    # jit once per transform: initial masks may need a full selection (slow op-by-op), and
    # a single jitted function is compiled once per params structure, not once per init.
    init_masks = jax.jit(lambda p, k: method.init(p, k, pred))

    def init_fn(params):
        prunable_lib.check_selects_something(params, pred)
        key = jax.random.PRNGKey(seed)
        masks, method_state = init_masks(params, jax.random.fold_in(key, 0x7FFFFFFF))
        return SparsifyState(
            count=jnp.zeros([], jnp.int32),
            masks=masks,
            key=key,
            method_state=method_state,
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("sparsify: update(updates, state, params) needs params")
        tree = prunable_lib.prunable_tree(params, pred)
        step = state.count
        masks, method_state, inner_state = state.masks, state.method_state, state.inner_state

        if not fixed:

            def recompute(old, mstate):
                key = jax.random.fold_in(state.key, step)
                return method.update(params, updates, old, mstate, step, key, pred)

            if every_step:  # no cond: it would only add copies of its operands
                new, method_state = recompute(masks, method_state)
            else:  # only masks go through the cond; the moment reset below is elementwise
                new, method_state = jax.lax.cond(
                    method.is_update_step(step), recompute, lambda m, s: (m, s),
                    masks, method_state,
                )
            # Zero the inner state where the mask changed: the identity on steps without an
            # update, and it fuses with the inner update instead of being copied by a cond.
            same = jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.equal, masks, new))
            pr = jax.tree_util.tree_leaves(tree)
            inner_state = _map_param_shaped(
                inner_state,
                params,
                lambda x, i: jnp.where(same[i], x, jnp.zeros_like(x)) if pr[i] else x,
            )
            masks = new

        def mask_grad(g, m, pr):
            return jnp.where(m, g, jnp.zeros_like(g)) if pr else g

        grads = jax.tree_util.tree_map(mask_grad, updates, masks, tree)
        new_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)

        def land(u, m, p, pr):
            return jnp.where(m, u, -p).astype(u.dtype) if pr else u

        new_updates = jax.tree_util.tree_map(land, new_updates, masks, params, tree)
        new_state = SparsifyState(
            count=optax.safe_increment(step),
            masks=masks,
            key=state.key,
            method_state=method_state,
            inner_state=inner_state,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(opt_state: Any) -> SparsifyState:
    """The (first) :class:`SparsifyState` inside an arbitrary optimizer state."""
    leaves = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, SparsifyState)
    )
    for leaf in leaves:
        if isinstance(leaf, SparsifyState):
            return leaf
    raise ValueError("opt_state holds no sparsify state: was the optimizer built with sparsify?")


def masks_of(opt_state: Any) -> Any:
    """The current masks held in ``opt_state`` (anywhere inside chains, MultiSteps, ...)."""
    return find_state(opt_state).masks


def apply_masks(params: Any, masks: Any) -> Any:
    """``params * masks`` with scalar ``True`` masks on non-prunable leaves."""
    return jax.tree_util.tree_map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def forward_params(params: Any, opt_state: Any) -> Any:
    """Params as the forward pass should see them: masked by the masks in ``opt_state``."""
    return apply_masks(params, masks_of(opt_state))
