"""``sparsify``: wrap any Optax transformation so that it trains a sparse network.

docs/design.md, "Optimizer side". One update:

1. count the pruned weights that are not 0 in a fixed strided sample of every leaf (a
   transform *after* ``sparsify`` changed its updates, or params were edited outside the
   optimizer); the count is kept in the state, and reading the state then raises;
2. on mask-update steps (the method's declared :class:`~sparsejax.methods.Cadence`,
   ``lax.cond``), compute new masks with the method (it may read params and grads), and zero
   the inner optimizer's state (Adam moments, accumulated gradients, ...) at every position
   whose mask changed, so dropped and regrown weights carry no stale moments;
3. mask the gradients, so pruned weights accumulate no moments (for a method with
   ``hold_grown``, SET and RigL, the entries this step's mask update grew are masked too, so
   they stay at exactly 0 with zero moments through this step);
4. run ``inner``;
5. return ``where(mask, updates, -params)`` so that ``optax.apply_updates`` lands pruned
   weights at exactly 0: after every step ``params == params * mask``.

The state's fields are brought to their declared dtypes on entry (:func:`canonical_state`:
``optax.contrib.sam`` blends states arithmetically), and with ``packed_masks=True`` the masks
are stored 8 per byte (:mod:`sparsejax.packing`) and unpacked inside the update.

Composition rule: nothing that changes updates may run after ``sparsify`` (README,
"Composition rules"); transforms that rescale updates go *inside* it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax import packing
from sparsejax import prunable as prunable_lib
from sparsejax.methods.base import MaskMethod, check_method

COMPOSE_HINT = (
    "Transforms that change updates go inside sparsify: "
    "sparsify(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr)), method); "
    "wrappers that only skip or accumulate steps (MultiSteps, apply_if_finite, masked, "
    "multi_transform, inject_hyperparams) may go outside. See README, 'Composition rules'."
)


class SparsifyState(NamedTuple):
    """State of :func:`sparsify`."""

    count: jax.Array  # shape=(), int32: number of updates applied so far
    masks: Any  # pytree like params: bool arrays on prunable leaves (uint8, 8 per byte along
    # the last axis, with packed_masks=True: sparsejax.packing), scalar True elsewhere
    key: jax.Array  # shape=(2,), uint32: base PRNG key; step t uses fold_in(key, t)
    method_state: Any  # the mask method's own state
    inner_state: Any  # the wrapped transformation's state
    target_sparsity: jax.Array  # shape=(), float32: the method's target for the latest step
    violations: jax.Array  # shape=(), int32: non-zero pruned weights in the latest sample
    dense_weights: jax.Array  # shape=(), bool: the latest update kept pruned weights (STE)
    forward_weight: jax.Array  # shape=(), float32: weight of pruned entries in the next forward


def map_param_shaped(state: Any, params: Any, fn) -> Any:
    """Apply ``fn(state_leaf, i)`` (``i``: index of the param leaf) to every params-shaped
    subtree of ``state``: one whose tree structure equals that of ``params`` and whose leaves
    have the params' shapes (Adam's ``mu``/``nu``, MultiSteps' accumulators, ...).

    ``optax.tree_utils.tree_map_params`` finds the same subtrees by calling ``inner.init`` on a
    placeholder, which inits that read their params' shapes or dtypes (``optax.contrib.muon``,
    schedule-free) cannot run; matching by structure and shape works for every optimizer.
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


SAMPLE = 4096  # entries per leaf that every update checks (a strided sample)


def _sample_strides(shape: tuple[int, ...], sample: int) -> list[int]:
    """Per-axis strides, last axis first, whose strided view of ``shape`` holds about
    ``sample`` entries (``prod ceil(d / stride)``)."""
    need = -(-math.prod(shape) // sample)  # the total stride still to apply
    strides = [1] * len(shape)
    for axis in reversed(range(len(shape))):
        if need <= 1:
            break
        strides[axis] = min(shape[axis], need)
        need = -(-need // strides[axis])
    return strides


def count_violations(params: Any, masks: Any, *, sample: int | None = None) -> Any:
    """Per leaf: how many weights the mask prunes are not exactly 0 (int32; 0 off masks).

    ``sample``: look only at a fixed strided subset of about that many entries per leaf,
    strided along the last axes (:func:`_sample_strides`): no reshape, so a leaf sharded over
    a device mesh is sampled on its shards (a strided view of the flattened leaf makes GSPMD
    gather it whole).
    """

    def leaf(p, m):
        if not jnp.ndim(m):
            return jnp.int32(0)
        if sample is not None and p.size > sample:
            window = tuple(slice(None, None, st) for st in _sample_strides(p.shape, sample))
            p, m = p[window], m[window]
        return jnp.sum((p != 0) & ~m, dtype=jnp.int32)

    return jax.tree_util.tree_map(leaf, params, masks)


def violations_message(n: int, step: int) -> str:
    """The error for ``n`` pruned weights found non-zero when update ``step`` began."""
    return (
        f"sparsify: {n} pruned weights were not 0 when update {step} began: a transform after "
        "sparsify changed its updates (e.g. optax.chain(sparsify(...), "
        "optax.clip_by_global_norm(...)), optax.lookahead(sparsify(...))) or params were "
        f"edited outside the optimizer. {COMPOSE_HINT}"
    )


def _raise_violations(n, step) -> None:
    raise ValueError(violations_message(int(n), int(step)))


def canonical_state(state: SparsifyState) -> SparsifyState:
    """``state`` with bool (unpacked) masks and every field in its declared dtype.

    Wrappers that blend states arithmetically (``optax.contrib.sam`` keeps its inner state with
    ``cond * new + (1 - cond) * old``) hand back bool fields as int32 0/1; comparing, negating
    (``~``) and ``lax.cond`` need them as declared.
    """
    key = state.key
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = key.astype(jnp.uint32)
    return state._replace(
        count=jnp.asarray(state.count, jnp.int32),
        masks=packing.bool_masks(state.masks),
        key=key,
        target_sparsity=jnp.asarray(state.target_sparsity, jnp.float32),
        violations=jnp.asarray(state.violations, jnp.int32),
        dense_weights=jnp.asarray(state.dense_weights) != 0,
        forward_weight=jnp.asarray(state.forward_weight, jnp.float32),
    )


def sparsify(
    inner: optax.GradientTransformation,
    method: MaskMethod,
    *,
    prunable: prunable_lib.Predicate | None = None,
    seed: int = 0,
    on_violation: str = "count",
    packed_masks: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Train only the unmasked weights of ``params`` with ``inner``; masks come from ``method``.

    Args:
      inner: any Optax transformation (``optax.adamw(...)``, a chain, inject_hyperparams,
        ``optax.contrib`` optimizers...). Anything that rescales updates (clipping, schedules,
        ``reduce_on_plateau``) belongs here, inside ``sparsify``.
      method: a :class:`sparsejax.methods.MaskMethod` (``gradual``, ``static``, ``nm``,
        ``fixed``).
      prunable: predicate ``(path, leaf) -> bool`` choosing prunable leaves (default:
        :func:`sparsejax.prunable.default_prunable`).
      seed: seed of the PRNG key used by random scores (step t uses ``fold_in(key, t)``).
      on_violation: what an update does when its sample finds pruned weights that are not 0
        (only possible when something outside ``sparsify`` changed them): ``"count"``
        (default) records the number in the state's ``violations``, and every function that
        reads the state (:func:`sparsejax.masks_of`, ``prune``, ``check``, ``sparsity_stats``)
        then raises ``ValueError``; ``"raise"`` also raises from inside the jitted update
        through ``jax.debug.callback`` (a ``JaxRuntimeError`` quoting the message), which
        costs ~12% of a small MLP's CPU step: a debugging aid.
      packed_masks: store the masks bit-packed in the state, 8 entries per byte along each
        leaf's last axis (:mod:`sparsejax.packing`): an eighth of the bool masks' memory. The
        update unpacks them inside the jitted step; methods and every reader of the state
        (:func:`sparsejax.masks_of`, ...) see bool masks, equal bit for bit.

    ``update`` requires ``params``. Masks are in the state: see :func:`sparsejax.masks_of`;
    call :func:`sparsejax.prune` after ``init`` so the first forward pass is already sparse.
    """
    check_method(method)
    if not hasattr(inner, "init") or not hasattr(inner, "update"):
        raise ValueError(f"inner must be an optax GradientTransformation, got {type(inner)!r}")
    if on_violation not in ("raise", "count"):
        raise ValueError(f"on_violation must be 'raise' or 'count', got {on_violation!r}")
    if not isinstance(packed_masks, bool):
        raise ValueError(f"packed_masks must be True or False, got {packed_masks!r}")
    store = packing.pack_tree if packed_masks else (lambda m: m)
    pred = prunable_lib.resolve(prunable)
    inner = optax.with_extra_args_support(inner)
    cadence = method.cadence
    # jit once per transform: initial masks may need a full selection (slow op-by-op), and
    # a single jitted function is compiled once per params structure, not once per init.
    init_masks = jax.jit(lambda p, k: method.init(p, k, pred))

    def init_fn(params):
        prunable_lib.check_selects_something(params, pred)
        key = jax.random.PRNGKey(seed)
        masks, method_state = init_masks(params, jax.random.fold_in(key, 0x7FFFFFFF))
        target = method.target(jnp.int32(0)) if cadence.fixed else jnp.zeros([], jnp.float32)
        dense_weights, beta = phase(jnp.int32(0))
        return SparsifyState(
            count=jnp.zeros([], jnp.int32),
            masks=store(masks),
            key=key,
            method_state=method_state,
            inner_state=inner.init(params),
            target_sparsity=jnp.asarray(target, jnp.float32),
            violations=jnp.zeros([], jnp.int32),
            dense_weights=dense_weights,
            forward_weight=beta,
        )

    def phase(step):
        """(straight-through at ``step``, forward weight of pruned entries at ``step``)."""
        st = jnp.asarray(method.straight_through)
        if method.hard_from is not None:
            st = st & (step < method.hard_from)
        beta = (jnp.float32(0.0) if method.pruned_weight is None
                else jnp.asarray(method.pruned_weight(step), jnp.float32))
        return st, jnp.where(st, beta, 0.0)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("sparsify: update(updates, state, params) needs params")
        tree = prunable_lib.prunable_tree(params, pred)
        state = canonical_state(state)
        step = state.count
        masks, method_state, inner_state = state.masks, state.method_state, state.inner_state
        target = state.target_sparsity

        # Before the first update params may still be dense (init does not touch them). A
        # composition that breaks the zeros leaves every pruned weight it touches non-zero, so
        # a fixed strided sample of each leaf (<= SAMPLE entries) detects it at ~no cost.
        n_bad = sum(jax.tree_util.tree_leaves(count_violations(params, masks, sample=SAMPLE)))
        violations = jnp.where((step > 0) & ~state.dense_weights, jnp.asarray(n_bad, jnp.int32), 0)
        st, _ = phase(step)
        if on_violation == "raise":
            jax.lax.cond(violations > 0,
                         lambda n, t: jax.debug.callback(_raise_violations, n, t),
                         lambda n, t: None, violations, step)

        if not cadence.fixed:

            def recompute(old, mstate):
                key = jax.random.fold_in(state.key, step)
                return method.update(params, updates, old, mstate, step, key, pred)

            if cadence.every_step:  # no cond: it would only add copies of its operands
                new, method_state = recompute(masks, method_state)
            else:  # only masks go through the cond; the moment reset below is elementwise
                # The kept branch returns the update's types: a wrapper that did arithmetic on
                # the state (optax.contrib.sam) may have widened the method state's dtypes
                # (masks are bool already: canonical_state).
                types = (jax.eval_shape(recompute, masks, method_state)
                         if jax.tree_util.tree_leaves(method_state) else None)

                def keep(m, s):
                    if types is None:
                        return m, s
                    return jax.tree_util.tree_map(
                        lambda x, t: jnp.asarray(x, t.dtype), (m, s), types)

                new, method_state = jax.lax.cond(
                    cadence.is_update_step(step), recompute, keep, masks, method_state,
                )
            # Zero the inner state where the mask changed: the identity on steps without an
            # update, and it fuses with the inner update instead of being copied by a cond.
            # Straight-through weights keep training through mask changes: no reset then.
            same = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
                lambda a, b: jnp.equal(a, b) | st, masks, new))
            pr = jax.tree_util.tree_leaves(tree)
            inner_state = map_param_shaped(
                inner_state,
                params,
                lambda x, i: jnp.where(same[i], x, jnp.zeros_like(x)) if pr[i] else x,
            )
            # hold_grown: this step trains only what was active before and stays active.
            train = (jax.tree_util.tree_map(jnp.logical_and, masks, new) if method.hold_grown
                     else new)
            masks = new
            target = jnp.asarray(method.target(step), jnp.float32)
        else:
            train = masks

        grads = updates
        if method.adjust_grads is not None:  # e.g. SR-STE's decay of the pruned weights
            refined = method.adjust_grads(grads, params, masks)
            grads = jax.tree_util.tree_map(lambda a, b: jnp.where(st, a, b), refined, grads)

        def mask_grad(g, m, pr):
            return jnp.where(m | st, g, jnp.zeros_like(g)) if pr else g

        grads = jax.tree_util.tree_map(mask_grad, grads, train, tree)
        new_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)

        def land(u, m, p, pr):  # straight-through phases keep the dense weights
            return jnp.where(m | st, u, -p).astype(u.dtype) if pr else u

        new_updates = jax.tree_util.tree_map(land, new_updates, train, params, tree)
        _, beta = phase(step + 1)
        new_state = SparsifyState(
            count=optax.safe_increment(step),
            masks=store(masks),
            key=state.key,
            method_state=method_state,
            inner_state=inner_state,
            target_sparsity=target,
            violations=jnp.asarray(violations, jnp.int32),
            dense_weights=st,
            forward_weight=beta,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
