"""Block-magnitude pruning of dense layers: keep whole ``(bk, bn)`` tiles of each kernel.

Each prunable kernel, seen as the ``(in, out)`` matrix it multiplies by
(:func:`sparsejax.axes.layout`; a conv kernel's window positions compete in one selection),
is cut into ``(bk, bn)`` tiles; a tile's score pools its entries' scores, by L2 norm
(``pooling="l2"``, the tile's Frobenius norm) or by their maximum (``"max"``: Narang et al.
2017, "Block-Sparse Recurrent Neural Networks", represent a block by its largest magnitude).
The lowest tiles are pruned, exactly, statically or along a gradual schedule (Zhu & Gupta
2017, "To prune, or not to prune"). Every pruned tile is all zero, so a trained model exports
as block-sparse (``sparsejax export --format bsr`` with the same block) and runs on
``BSRLinear`` kernels (Gray et al. 2017, "GPU Kernels for Block-Sparse Weights").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import axes as axes_lib
from sparsejax import masks as masks_lib
from sparsejax import prunable as prunable_lib
from sparsejax.axes import AxisSpec
from sparsejax.methods.base import MaskMethod, score_name
from sparsejax.methods.structured import Plan, structured_method
from sparsejax.paths import path_str
from sparsejax.schedules import Schedule

POOLINGS = ("l2", "max")


def _tiles(x: jax.Array, lay: axes_lib.Layout, block: tuple[int, int]) -> jax.Array:
    """``x`` as ``(*batch, K/bk, bk, N/bn, bn)``."""
    mat = axes_lib.to_matrix(x, lay)
    *lead, k, n = mat.shape
    return mat.reshape(*lead, k // block[0], block[0], n // block[1], block[1])


def pool_tiles(x: jax.Array, lay: axes_lib.Layout, block: tuple[int, int],
               pooling: str) -> jax.Array:
    """One score per tile: the L2 norm or the maximum of its entries."""
    t = _tiles(x.astype(jnp.float32), lay, block)
    if pooling == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(t), axis=(-3, -1)))
    return jnp.max(t, axis=(-3, -1))


def expand_tiles(keep: jax.Array, lay: axes_lib.Layout, block: tuple[int, int],
                 shape: Sequence[int]) -> jax.Array:
    """The leaf-shaped mask of kept tiles."""
    full = jnp.repeat(jnp.repeat(keep, block[0], axis=-2), block[1], axis=-1)
    return axes_lib.from_matrix(full, lay, shape)


def block_plan(params: Any, prunable: prunable_lib.Predicate, block: tuple[int, int],
               pooling: str, axis: AxisSpec, skip_indivisible: bool) -> Plan:
    """The tiles of every prunable kernel (``ValueError`` naming kernels the block does not
    tile, unless ``skip_indivisible``: then they stay dense)."""
    tree = prunable_lib.prunable_tree(params, prunable)
    lay_plan = masks_lib.block_plan(params, block, tree, axis=axis,
                                    skip_indivisible=skip_indivisible)
    layouts = lay_plan.layouts
    pool = {name: (lambda x, lay=lay: pool_tiles(x, lay, block, pooling))
            for name, lay in layouts.items()}

    def expand(kept, params_, tree_):
        def leaf(path, p, pr):
            if not pr:
                return jnp.bool_(True)
            name = path_str(path)
            if name not in kept:
                return jnp.ones(jnp.shape(p), jnp.bool_)
            return expand_tiles(kept[name], layouts[name], block, jnp.shape(p))

        return jax.tree_util.tree_map_with_path(leaf, params_, tree_)

    return Plan(pool, expand)


def block(
    sparsity: float,
    *,
    block: tuple[int, int] = (32, 32),
    score: str | Callable[..., Any] = "magnitude",
    schedule: Schedule | None = None,
    pooling: str = "l2",
    allocation: str = "uniform",
    axis: AxisSpec = "contraction",
    skip_indivisible: bool = False,
) -> MaskMethod:
    """Block-magnitude pruning (module docstring) to ``sparsity`` of the tiles.

    Args:
      sparsity: fraction of tiles pruned (of each kernel: ``"uniform"``; of all: ``"global"``,
        one threshold on the pooled scores); with equal tiles this is the weight sparsity.
      block: ``(bk, bn)``: ``bk`` rows of the input axis by ``bn`` columns of the output axis
        (``BSRMatrix``'s block).
      score: ``"magnitude"``, ``"saliency"``, ``"random"`` or a callable
        ``(params, grads, key) -> pytree`` of non-negative scores.
      schedule: ``None``: static masks (at ``init``; at step 0 for a score that reads
        gradients). A :class:`sparsejax.schedules.Schedule` ending at ``sparsity``: gradual,
        masks recomputed at its update steps, pruned tiles never return.
      pooling: ``"l2"`` (tile L2 norm) or ``"max"``.
      axis, skip_indivisible: the matrix of each kernel (:mod:`sparsejax.axes`) and what to do
        with kernels the block does not tile (an error naming them, or left dense).
    """
    masks_lib.check_block(block)
    bk, bn = (int(b) for b in block)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    axes_lib.check_spec(axis)
    if not isinstance(skip_indivisible, bool):
        raise ValueError(f"skip_indivisible must be a bool, got {skip_indivisible!r}")

    def make_plan(params, prunable):
        return block_plan(params, prunable, (bk, bn), pooling, axis, skip_indivisible)

    kind = "static" if schedule is None else "gradual"
    return structured_method(
        make_plan, sparsity, score=score, schedule=schedule, allocation=allocation,
        name=f"block/{bk}x{bn}/{pooling}/{score_name(score)}/{kind}",
    )
