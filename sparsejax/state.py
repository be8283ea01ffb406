"""Reading a sparse optimizer state: masks, pruning params at init, exactness checks, stats.

The optimizer state is the single source of truth for sparsity (docs/design.md, "Optimizer
side"): :func:`sparsity_stats` reports the method's target and the measured sparsity with
the prunable and active counts that the masks define, and the training loop logs exactly
that. Every function here finds the :class:`~sparsejax.transforms.SparsifyState` anywhere
inside chains, wrappers and ``flax.nnx.Optimizer`` states, and refuses a state whose
composition cannot keep pruned weights at exactly 0 (README, "Composition rules").

Flax NNX: ``opt_state`` may be ``nnx.Optimizer(...).opt_state`` (every array wrapped in an
``OptVariable``) and ``params`` an ``nnx.State`` (``nnx.state(model, nnx.Param)``); both are
unwrapped internally (:func:`plain`). Results that are params (:func:`prune`,
:func:`forward_params`) come back in the form ``params`` was given (an ``nnx.State`` of the
same Variables for ``nnx.update(model, ...)`` / ``nnx.merge``); the others are plain pytrees:
:func:`masks_of` and :func:`check` nested dicts shaped like
``nnx.to_pure_dict(nnx.state(model, nnx.Param))``. Packed masks (``sparsify(...,
packed_masks=True)``) are unpacked: every function here sees and returns bool masks.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.errors import NoSparsifyState
from sparsejax.paths import path_str
from sparsejax.transforms import (
    COMPOSE_HINT,
    SparsifyState,
    canonical_state,
    count_violations,
    violations_message,
)


class SparsityStats(NamedTuple):
    """What the masks in an optimizer state say about a model (jittable)."""

    target_sparsity: jax.Array  # shape=(), float32: the method's target for the latest step
    sparsity: jax.Array  # shape=(), float32: pruned fraction of the prunable entries
    n_params: int  # every parameter entry
    n_prunable: int  # entries of the leaves the masks cover (the predicate sparsify used)
    n_active: jax.Array  # shape=(), int32 (float32 from 2**31 on): n_params minus pruned


def _nnx() -> Any:
    """``flax.nnx`` if it is imported (a tree holds NNX objects only then), else ``None``."""
    return sys.modules.get("flax.nnx")


def _has_nnx(tree: Any) -> bool:
    nnx = _nnx()
    if nnx is None:
        return False
    kinds = (nnx.Variable, nnx.State)
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, kinds))
    return isinstance(tree, kinds) or any(isinstance(x, kinds) for x in leaves)


def plain(tree: Any) -> Any:
    """``tree`` with every ``nnx.State`` turned into nested dicts (``nnx.to_pure_dict``) and
    every ``nnx.Variable`` (``Param``, ``nnx.Optimizer``'s ``OptVariable``/``OptArray``) into
    its value; other pytrees are returned as they are."""
    nnx = _nnx()
    if nnx is None:
        return tree
    kinds = (nnx.Variable, nnx.State)

    def leaf(x):
        if isinstance(x, nnx.State):
            return plain(nnx.to_pure_dict(x))
        if isinstance(x, nnx.Variable):
            return plain(x.get_value() if hasattr(x, "get_value") else x.value)
        return x

    return jax.tree_util.tree_map(leaf, tree, is_leaf=lambda x: isinstance(x, kinds))


def _like(params: Any, result: Any) -> Any:
    """``result`` (plain, shaped like :func:`plain` of ``params``) in ``params``' form: an
    ``nnx.State`` or a tree of Variables gets fresh Variables of the same types."""
    if not _has_nnx(params):
        return result
    nnx = _nnx()
    if isinstance(params, nnx.State):
        out = jax.tree_util.tree_map(lambda x: x, params)  # fresh Variables, same structure
        nnx.replace_by_pure_dict(out, result)
        return out
    return jax.tree_util.tree_map(
        lambda v, r: v.replace(r) if isinstance(v, nnx.Variable) else r, params, result,
        is_leaf=lambda x: isinstance(x, nnx.Variable))


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    raise LookupError(key)  # flattened custom nodes: their children cannot be addressed


def _composition_problems(opt_state: Any, path: tuple) -> list[str]:
    """Why the SparsifyState at ``path`` inside ``opt_state`` cannot stay exact."""
    problems, node, parent = [], opt_state, None
    for key in path:
        if isinstance(node, optax.LookaheadState):
            problems.append("optax.lookahead wraps sparsify (its slow weights revive pruned ones)")
        if type(node) is tuple and isinstance(key, jax.tree_util.SequenceKey):
            if key.idx < len(node) - 1:  # optax.chain's state is a plain tuple
                problems.append(
                    f"sparsify is transform {key.idx + 1} of {len(node)} in an optax.chain: the "
                    f"{len(node) - key.idx - 1} after it change its updates"
                )
        if (isinstance(node, dict) and isinstance(key, jax.tree_util.DictKey)
                and not isinstance(parent, optax.MultiTransformState)):
            keys = list(node)
            if keys.index(key.key) < len(keys) - 1:  # named_chain's state: an OrderedDict
                problems.append(f"sparsify ({key.key!r}) is not last in an optax.named_chain")
        try:
            parent, node = node, _child(node, key)
        except (LookupError, AttributeError, TypeError, IndexError):
            break
    return problems


def find_state(opt_state: Any) -> SparsifyState:
    """The (first) :class:`SparsifyState` inside an arbitrary optimizer state.

    Raises :class:`~sparsejax.errors.NoSparsifyState` (a ``ValueError``) when there is none,
    and ``ValueError`` when the state shows a composition that breaks the zeros (``sparsify``
    followed by other transforms in a chain, wrapped by ``optax.lookahead``) or when an update
    found pruned weights that were not 0.
    """
    opt_state = plain(opt_state)
    found = jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda x: isinstance(x, SparsifyState)
    )[0]
    for path, leaf in found:
        if isinstance(leaf, SparsifyState):
            problems = _composition_problems(opt_state, path)
            if problems:
                raise ValueError(
                    "sparsify cannot keep pruned weights at 0 in this optimizer: "
                    + "; ".join(problems) + ". " + COMPOSE_HINT
                )
            leaf = canonical_state(leaf)  # bool masks (unpacked), declared dtypes
            n = leaf.violations
            if not isinstance(n, jax.core.Tracer) and int(n) > 0:
                raise ValueError(violations_message(int(n), int(leaf.count) - 1))
            return leaf
    raise NoSparsifyState(
        "opt_state holds no sparsify state: was the optimizer built with sparsify?")


def masks_of(opt_state: Any) -> Any:
    """The current masks held in ``opt_state`` (anywhere inside chains, MultiSteps, ...), as
    bool arrays (unpacked when stored packed; plain nested dicts for ``nnx.Optimizer``)."""
    return find_state(opt_state).masks


def _is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _pairs(masks: Any, params: Any) -> list[tuple[Any, Any]]:
    """``(mask_leaf, params_subtree)`` pairs; a ``MaskedNode`` mask (``sparsify`` under
    ``optax.masked``/``multi_transform``) pairs with the params subtree it stands for."""
    m_leaves, treedef = jax.tree_util.tree_flatten(masks, is_leaf=_is_masked_node)
    return list(zip(m_leaves, treedef.flatten_up_to(params), strict=True))


def apply_masks(params: Any, masks: Any) -> Any:
    """``params * masks`` with scalar ``True`` masks on non-prunable leaves (leaves outside
    the masks' reach under ``optax.masked``/``multi_transform`` are returned unchanged)."""
    return jax.tree_util.tree_map(
        lambda m, p: p if _is_masked_node(m) else jnp.where(m, p, jnp.zeros_like(p)),
        masks, params, is_leaf=_is_masked_node,
    )


def prune(params: Any, opt_state: Any) -> Any:
    """``params`` with the masks of ``opt_state`` applied: call it right after ``tx.init`` so
    the first forward pass of a static-sparse run is already sparse.

    >>> # state = tx.init(params); params = sparsejax.prune(params, state)

    An ``nnx.State`` ``params`` gives an ``nnx.State``: ``nnx.update(model, prune(...))``.
    """
    return _like(params, apply_masks(plain(params), masks_of(opt_state)))


@jax.custom_vjp
def _straight_through(w: jax.Array, scale: jax.Array) -> jax.Array:
    return w * scale.astype(w.dtype)


def _st_fwd(w, scale):
    return _straight_through(w, scale), scale


def _st_bwd(scale, g):  # the gradient passes to every weight unchanged (straight-through)
    return g, jnp.zeros_like(scale)


_straight_through.defvjp(_st_fwd, _st_bwd)


def forward_params(params: Any, opt_state: Any) -> Any:
    """Params as the forward pass should see them, differentiable straight-through.

    Forward: ``W * (E + (1 - E) beta)`` with the masks ``E`` and ``beta`` the state's
    ``forward_weight`` (0 for hard masks and STE/SR-STE; MDGF's decaying ``beta_t``);
    backward: the identity (``jax.custom_vjp``), so every weight, kept or pruned, receives the
    gradient of the loss with respect to its forward value (Bengio et al. 2013; Zhou et al.
    2021). ``sparsify`` then masks that gradient for hard-mask methods and keeps it for
    straight-through ones. Leaves outside the masks are returned unchanged; an ``nnx.State``
    ``params`` gives an ``nnx.State`` (for ``nnx.merge(graphdef, ...)``).
    """
    state = find_state(opt_state)
    like, params = params, plain(params)
    beta = state.forward_weight

    def leaf(m, p):
        if _is_masked_node(m) or not jnp.ndim(m):
            return p
        return _straight_through(p, jnp.where(m, 1.0, beta).astype(jnp.float32))

    return _like(like, jax.tree_util.tree_map(leaf, state.masks, params,
                                              is_leaf=_is_masked_node))


def check(params: Any, opt_state: Any) -> Any:
    """Per leaf of ``params``: how many weights the masks prune are not exactly 0 (0 in the
    straight-through phase of STE-style methods, which keep pruned weights by design).

    All zeros means ``params == params * mask``. Raises ``ValueError`` for a composition that
    cannot stay exact (see :func:`find_state`). Jittable. A plain pytree (nested dicts for
    ``nnx.State`` params).
    """
    state = find_state(opt_state)  # straight-through phases keep pruned weights on purpose
    params = plain(params)
    return jax.tree_util.tree_map(
        lambda m, p: jax.tree_util.tree_map(lambda _: jnp.int32(0), p) if _is_masked_node(m)
        else jnp.where(state.dense_weights, 0, count_violations(p, m)),
        state.masks, params, is_leaf=_is_masked_node,
    )


def violations_report(per_leaf: Any, limit: int = 5) -> str:
    """``"a/kernel: 3, b/kernel: 1"`` for the leaves of a :func:`check` result that are > 0."""
    rows = [(path_str(p), int(v))
            for p, v in jax.tree_util.tree_flatten_with_path(per_leaf)[0] if int(v)]
    text = ", ".join(f"{name}: {v}" for name, v in rows[:limit])
    return text + (f" (and {len(rows) - limit} more leaves)" if len(rows) > limit else "")


def sparsity_stats(opt_state: Any, params: Any) -> SparsityStats:
    """Target and measured sparsity, with the counts the masks define (jittable).

    A leaf is prunable when its mask has the leaf's shape (``sparsify`` gives every other
    leaf a scalar ``True``), so the counts follow the predicate ``sparsify`` was built with.
    """
    state = find_state(opt_state)
    params = plain(params)
    n_params = n_prunable = 0
    kept = []
    for m, p in _pairs(state.masks, params):
        size = sum(int(np.prod(np.shape(x), dtype=np.int64)) for x in jax.tree_util.tree_leaves(p))
        n_params += size
        if _is_masked_node(m) or not np.ndim(m):
            continue
        if np.shape(m) != np.shape(p):
            raise ValueError(f"masks: a mask of shape {np.shape(m)} on a leaf {np.shape(p)}")
        n_prunable += size
        kept.append(jnp.sum(m, dtype=jnp.int32))
    n_kept = sum(kept) if kept else jnp.int32(0)
    sparsity = 1.0 - n_kept / n_prunable if n_prunable else jnp.float32(0.0)
    return SparsityStats(
        target_sparsity=state.target_sparsity,
        sparsity=jnp.asarray(sparsity, jnp.float32),
        n_params=n_params,
        n_prunable=n_prunable,
        n_active=jnp.asarray(n_params - n_prunable + n_kept,
                             jnp.int32 if n_params < 2**31 else jnp.float32),
    )
