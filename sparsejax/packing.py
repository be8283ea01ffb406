"""Bit-packed masks: 8 mask entries per byte in the optimizer state (``sparsify(...,
packed_masks=True)``; docs/design.md, "Optimizer side").

A bool mask costs one byte per weight (1.3 GB beside a 1.3B model's weights); packed, it
costs one bit. A prunable leaf's mask of shape ``(..., d)`` with ``d % 8 == 0`` is stored as a
uint8 array of shape ``(..., d // 8)``: bit ``j`` (least significant first) of byte ``k`` holds
entry ``8k + j`` of the last axis (``jnp.packbits(..., bitorder="little")``). Masks whose last
axis is not a multiple of 8 stay bool (1 byte per entry): a packed leaf is then a plain uint8
array that says its own unpacked shape, so the state stays a tree of plain arrays that every
wrapper (``nnx.Optimizer``, ``optax.contrib.sam``, checkpoints) carries unchanged. Packing along
the last axis keeps every other axis as it is, so a mask sharded like its kernel stays sharded
(the last axis packs locally when its shard length is a multiple of 8).

``sparsify`` unpacks inside the jitted update, so mask methods, and every reader of the state
(:func:`sparsejax.masks_of`, ``prune``, ``check``, ...), see bool masks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PACKED = jnp.uint8  # the dtype of a packed mask leaf (bool masks are bool, scalar or not)


def packable(shape: tuple[int, ...]) -> bool:
    """Whether a mask of ``shape`` is stored packed: ``ndim >= 1`` and the last axis a
    positive multiple of 8."""
    return len(shape) >= 1 and shape[-1] > 0 and shape[-1] % 8 == 0


def pack(mask: jax.Array) -> jax.Array:
    """``mask`` (bool, last axis a multiple of 8) as uint8, 8 entries per byte."""
    return jnp.packbits(jnp.asarray(mask, jnp.bool_), axis=-1, bitorder="little")


def unpack(bits: jax.Array) -> jax.Array:
    """The bool mask that :func:`pack` packed (exact inverse): last axis ``8 x`` as long."""
    return jnp.unpackbits(jnp.asarray(bits, PACKED), axis=-1, bitorder="little").astype(
        jnp.bool_)


def pack_tree(masks: Any) -> Any:
    """Pack every mask leaf of a :func:`packable` shape; others (scalar masks of non-prunable
    leaves, last axes not a multiple of 8) stay bool."""
    return jax.tree_util.tree_map(lambda m: pack(m) if packable(jnp.shape(m)) else m, masks)


def bool_masks(masks: Any) -> Any:
    """The masks as bool arrays, whether they are stored packed (uint8) or not.

    Also undoes what arithmetic on the state does to bool leaves: ``optax.contrib.sam`` blends
    its inner state with ``cond * a + (1 - cond) * b``, which turns bool masks into int32 0/1
    (packed bytes stay uint8 there); ``lax.cond`` then refuses branches of different types.
    """
    def leaf(m):
        dtype = jnp.result_type(m)
        if dtype == PACKED:
            return unpack(m)
        return m if dtype == jnp.bool_ else jnp.asarray(m) != 0

    return jax.tree_util.tree_map(leaf, masks)


def mask_bytes(masks: Any) -> int:
    """Bytes of the mask arrays, packed or not (abstract ``ShapeDtypeStruct`` leaves too)."""
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(masks))
