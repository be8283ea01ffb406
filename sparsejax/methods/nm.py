"""N:M structured sparsity: keep the N largest of every M consecutive weights along the input
axis (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"; Zhou et al. 2021,
"Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch").

Masks are recomputed from the score every ``update_every`` steps from ``begin_step``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax import masks as masks_lib
from sparsejax import prunable as prunable_lib
from sparsejax import scores as scores_lib
from sparsejax.methods.base import MaskMethod, always, dense_masks


def nm(
    n: int,
    m: int,
    *,
    score: str = "magnitude",
    axis: int = 0,
    update_every: int = 1,
    begin_step: int = 0,
) -> MaskMethod:
    """N:M masks along ``axis`` (axis 0 = contraction axis of a Flax ``(in, out)`` kernel)."""
    masks_lib.check_nm(n, m)
    score_fn = scores_lib.get(score)
    if not (isinstance(update_every, int) and update_every >= 1):
        raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
    if not (isinstance(begin_step, int) and begin_step >= 0):
        raise ValueError(f"begin_step must be an int >= 0, got {begin_step!r}")

    def check_shapes(params, prunable):
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            if prunable(path, leaf):
                masks_lib.check_nm(n, m, leaf.shape, axis, prunable_lib.path_str(path))

    def init(params, key, prunable):
        del key
        check_shapes(params, prunable)
        return dense_masks(params, prunable), ()

    def update(params, grads, masks, state, step, key, prunable):
        tree = prunable_lib.prunable_tree(params, prunable)
        return masks_lib.nm_masks(score_fn(params, grads, key), n, m, tree, axis=axis), state

    def is_update_step(step):
        step = jnp.asarray(step)
        return (step >= begin_step) & ((step - begin_step) % update_every == 0)

    every_step = update_every == 1 and begin_step == 0
    return MaskMethod(
        init, update, always if every_step else is_update_step, name=f"nm/{n}:{m}"
    )
