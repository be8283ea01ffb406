"""Dynamic sparse training: SET and RigL (constant sparsity, the connectivity moves).

- SET: Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive
  sparse connectivity inspired by network science" (drop the smallest |w|, grow at random).
- RigL: Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners" (drop the smallest
  |w|, grow where the dense gradient is largest).

Both start from a random mask at ``sparsity`` with ``"uniform"`` or ``"erk"`` per-layer
allocation (exact per-layer counts, :func:`sparsejax.methods.gradual.select`), and then, at
every step ``t`` with ``t % update_every == 0`` and ``0 < t < end_step`` (Algorithm 1 of the
RigL paper, "t mod ΔT == 0 and t < T_end"; step 0 is left out because the mask was just drawn
in ``init``), every prunable leaf with ``n`` active weights

1. drops the ``k = floor(f_t n)`` active weights of lowest ``|w|``, with
   ``f_t = drop_fraction * (1 + cos(pi * min(t, end_step) / end_step)) / 2``;
2. grows ``k`` weights among those not kept by the drop, by the highest uniform score (SET)
   or the highest ``|dense gradient|`` (RigL);
3. (``hold_grown=True``) keeps the grown weights at exactly 0 through the step that grows
   them: that step's update skips them, so they start training at the next step, from 0 with
   zero optimizer moments.

The defaults follow the reference implementation (google-research/rigl,
``rigl/sparse_optimizers.py``, ``SparseSETOptimizer._get_update_op`` and
``SparseRigLOptimizer.generic_mask_update``):

- ``rounding="floor"``: the reference's ``n_prune = int32(float32(n_ones) * drop_fraction)``
  truncates, with ``drop_fraction`` from TF's ``cosine_decay`` in float32 (evaluated here in the
  same order: ``f0 * (0.5 * (1 + cos(pi * (t / end_step))))``). ``rounding="round"``
  (half-to-even, like every count in :mod:`sparsejax.masks`; the default before) differs by at
  most one weight per leaf, e.g. where float32 error puts ``f_t n`` just below an integer
  (``cos(pi / 2)`` is ``-4.4e-8`` in float32, so ``0.25 * 0.5 * (1 + cos(pi / 2)) * 8`` is
  ``0.99999994``: floor drops 0 weights, round 1);
- ``hold_grown=True``: in the reference a grown weight is still 0 after the step that grows it
  (SET updates the mask after that step's optimizer update, RigL instead of it).
  ``hold_grown=False`` (the default before) lets the grown weights take that step's update
  (from 0, with zero moments: with SGD they hold ``-lr * g`` after it);
- the grow candidates are all weights outside the kept set (``score_grow_lifted`` gives only
  the kept ones the lowest score), *including the weights just dropped*: a dropped weight that
  is grown again simply stays active (``reinit_when_same=False``), keeping its value and its
  optimizer moments; the per-layer count stays exactly ``n``;
- the cosine decay of the drop fraction is ``cosine_decay(f0, t, end_step - begin_step)``
  with ``begin_step = 0``, i.e. the formula above.

Differences from the reference: ties are broken deterministically (lower flat index kept,
as everywhere in :mod:`sparsejax.masks`) instead of by adding N(0, 1e-5) noise to the drop
score; the mask update runs inside :func:`sparsejax.sparsify` *before* that step's optimizer
update and reads the weights before it (SET's reference reads them after it); on a RigL
update step the weights that stay active still take the step's update (the reference skips
the optimizer update on those steps). Dropped weights land at exactly 0 in the step that drops
them, and ``sparsify`` zeroes the inner optimizer's state wherever a mask changes.

The selections are exact and sort-free: one :func:`sparsejax.radix.select` for the drop and
one for the grow, each over all prunable leaves at once (a segment per leaf).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import checks, radix
from sparsejax import prunable as prunable_lib
from sparsejax import scores as scores_lib
from sparsejax.methods.base import MaskMethod, constant_target, periodic
from sparsejax.methods.gradual import Selection, check_allocation, select

ROUNDINGS = ("floor", "round")


def cosine_drop_fraction(
    step: jax.Array | int, drop_fraction: float, end_step: int
) -> jax.Array:
    """``f_t = drop_fraction * (1 + cos(pi * min(t, end_step) / end_step)) / 2`` (float32).

    The RigL schedule of the fraction of active weights replaced at step ``t`` (Evci et al.
    2020, eq. 1; the reference's ``cosine_decay(drop_fraction, t, end_step)``), with TF's
    float32 operations in TF's order: ``f0 * (0.5 * (1 + cos(pi * (t / end_step))))``.
    """
    t = jnp.minimum(jnp.asarray(step, jnp.float32), jnp.float32(end_step))
    completed = t / jnp.float32(end_step)
    decayed = jnp.float32(0.5) * (1.0 + jnp.cos(jnp.float32(math.pi) * completed))
    return jnp.float32(drop_fraction) * decayed


def _check(
    sparsity: float, update_every: int, end_step: int, drop_fraction: float, rounding: str,
    allocation: str | Selection,
) -> None:
    checks.sparsity("sparsity", sparsity)
    checks.integer("update_every", update_every, 1)
    checks.integer("end_step", end_step, 1)
    if end_step <= update_every:
        raise ValueError(
            f"end_step must be > update_every (updates run at multiples of update_every below "
            f"end_step), got end_step={end_step}, update_every={update_every}"
        )
    if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, int | float) or not (
        0.0 <= float(drop_fraction) <= 1.0
    ):
        raise ValueError(f"drop_fraction must be a float in [0, 1], got {drop_fraction!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    check_allocation(allocation)


def _grow_scores_set(params: Any, grads: Any, key: jax.Array) -> Any:
    del grads
    return scores_lib.random(params, key=key)


def _grow_scores_rigl(params: Any, grads: Any, key: jax.Array) -> Any:
    del params, key
    if grads is None:
        raise ValueError("rigl needs the dense gradient (sparsify passes it to update)")
    return jax.tree_util.tree_map(lambda g: jnp.abs(g).astype(jnp.float32), grads)


def drop_and_grow(
    params: Any,
    masks: Any,
    grow_scores: Any,
    fraction: jax.Array,
    prunable_tree: Any,
    *,
    rounding: str = "floor",
) -> Any:
    """One SET/RigL connectivity update of every prunable leaf (exact, sort-free).

    For a leaf with ``n`` active weights, ``k = floor(fraction * n)`` (or ``round``): keep
    the ``n - k`` active weights of largest ``|w|``, then activate the ``k`` entries of highest
    ``grow_scores`` outside the kept set (the just-dropped weights included, as in the RigL
    reference). Scores must be ``>= 0`` (``|g|``, uniform draws). Ties keep the lower flat
    index. Non-prunable leaves keep their masks.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    m_leaves, treedef = jax.tree_util.tree_flatten(masks)
    p_leaves = treedef.flatten_up_to(params)
    g_leaves = treedef.flatten_up_to(grow_scores)
    pr_leaves = treedef.flatten_up_to(prunable_tree)
    idx = [i for i, p in enumerate(pr_leaves) if p]
    if not idx:
        return masks
    segs = list(range(len(idx)))
    frac = jnp.asarray(fraction, jnp.float32)
    n_active = jnp.stack([jnp.sum(m_leaves[i], dtype=jnp.int32) for i in idx])
    prod = frac * n_active.astype(jnp.float32)
    k = (jnp.floor(prod) if rounding == "floor" else jnp.round(prod)).astype(jnp.int32)
    k = jnp.clip(k, 0, n_active)
    low = jnp.float32(-1.0)  # below every |w| and every score >= 0
    drop_keys = [
        radix.sortable_key(jnp.where(m_leaves[i], jnp.abs(p_leaves[i]).astype(jnp.float32), low))
        for i in idx
    ]
    kept = radix.select(drop_keys, segs, n_active - k)
    grow_keys = [
        radix.sortable_key(jnp.where(kp, low, g_leaves[i].astype(jnp.float32)))
        for i, kp in zip(idx, kept, strict=True)
    ]
    grown = radix.select(grow_keys, segs, k)
    out = list(m_leaves)
    for i, kp, gr in zip(idx, kept, grown, strict=True):
        out[i] = kp | gr
    return treedef.unflatten(out)


def _dst(
    name: str,
    grow_fn: Callable[[Any, Any, jax.Array], Any],
    sparsity: float,
    update_every: int,
    end_step: int,
    drop_fraction: float,
    allocation: str | Selection,
    power_scale: float,
    rounding: str,
    hold_grown: bool,
) -> MaskMethod:
    _check(sparsity, update_every, end_step, drop_fraction, rounding, allocation)
    if not isinstance(hold_grown, bool):
        raise ValueError(f"hold_grown must be True or False, got {hold_grown!r}")
    target = jnp.float32(sparsity)

    def init(params, key, prunable):
        sc = scores_lib.random(params, key=key)
        masks = select(sc, target, params, prunable, allocation=allocation,
                       power_scale=power_scale)
        return masks, ()

    def update(params, grads, masks, state, step, key, prunable):
        tree = prunable_lib.prunable_tree(params, prunable)
        fraction = cosine_drop_fraction(step, drop_fraction, end_step)
        new = drop_and_grow(params, masks, grow_fn(params, grads, key), fraction, tree,
                            rounding=rounding)
        return new, state

    alloc_name = allocation if isinstance(allocation, str) else "custom"
    return MaskMethod(
        init, update, periodic(update_every, begin_step=update_every, end_step=end_step),
        target=constant_target(sparsity), name=f"{name}/{alloc_name}", hold_grown=hold_grown,
    )


def set_(
    sparsity: float,
    *,
    update_every: int,
    end_step: int,
    drop_fraction: float = 0.3,
    allocation: str | Selection = "erk",
    power_scale: float = 1.0,
    rounding: str = "floor",
    hold_grown: bool = True,
) -> MaskMethod:
    """SET (Mocanu et al. 2018): drop the smallest |w|, regrow as many at random.

    Every ``update_every`` steps ``t`` with ``0 < t < end_step``, each prunable leaf replaces
    ``floor(f_t n)`` of its ``n`` active weights (``rounding="round"``: half-to-even), ``f_t``
    the cosine-decayed ``drop_fraction``
    (:func:`cosine_drop_fraction`, the RigL paper's schedule); the grown ones are the highest
    uniform scores :func:`sparsejax.scores.random` draws from the step's key (``sparsify``:
    ``fold_in(PRNGKey(seed), t)``) among the weights not kept. Per-layer counts are exact and
    constant; the initial mask is random with ``allocation`` (``"uniform"``, ``"erk"``, ...).
    Grown weights stay at 0 through the step that grows them (``hold_grown=False``: they take
    its update). See the module docstring for the reference choices.
    """
    return _dst("set", _grow_scores_set, sparsity, update_every, end_step, drop_fraction,
                allocation, power_scale, rounding, hold_grown)


def rigl(
    sparsity: float,
    *,
    update_every: int,
    end_step: int,
    drop_fraction: float = 0.3,
    allocation: str | Selection = "erk",
    power_scale: float = 1.0,
    rounding: str = "floor",
    hold_grown: bool = True,
) -> MaskMethod:
    """RigL (Evci et al. 2020, "Rigging the Lottery"): drop the smallest |w|, regrow as many
    where the dense gradient ``|g|`` is largest.

    The gradient is the one ``sparsify`` receives, before masking: the gradient of the loss
    with respect to every weight, pruned ones (which are 0) included. Same schedule, counts,
    ``rounding``, ``hold_grown`` and initial mask as :func:`set_`; see the module docstring for
    the reference choices.
    """
    return _dst("rigl", _grow_scores_rigl, sparsity, update_every, end_step, drop_fraction,
                allocation, power_scale, rounding, hold_grown)
