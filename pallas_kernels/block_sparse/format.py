"""Block-sparse-row (BSR) storage for a ``(K, N)`` kernel used as ``y = x @ W``.

Host-side packing in the spirit of the block-sparse kernels of Gray, Radford & Kingma,
"GPU Kernels for Block-Sparse Weights" (OpenAI, 2017) and of splash attention's block mask
info: the non-zero ``(bk, bn)`` blocks are found once, on the host, and stored packed; the
*layout* (which blocks exist) is static metadata. All-zero blocks are dropped.

The packed values are ordered by output block-column (CSC order of the block grid), so that
the blocks contributing to output block-column ``j`` are ``values[col_ptr[j]:col_ptr[j+1]]``
with K block-rows ``rows[col_ptr[j]:col_ptr[j+1]]`` (the per-output-block index tables).
The transposed layout (CSR order, used for ``dX = dY @ W.T``) is kept alongside.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True, eq=False)
class BSRLayout:
    """Static (hashable) block layout: shape, block size and CSC index tables (numpy)."""

    shape: tuple[int, int]
    block: tuple[int, int]
    rows: np.ndarray  # (nnz,) K block-row of each packed block, CSC order
    cols: np.ndarray  # (nnz,) N block-column of each packed block, non-decreasing
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        h = hashlib.sha1()
        for part in (self.shape, self.block):
            h.update(np.asarray(part, np.int64).tobytes())
        h.update(np.asarray(self.rows, np.int32).tobytes())
        h.update(np.asarray(self.cols, np.int32).tobytes())
        object.__setattr__(self, "digest", h.hexdigest())

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BSRLayout) and other.digest == self.digest

    def __repr__(self) -> str:
        return (
            f"BSRLayout(shape={self.shape}, block={self.block}, nnz_blocks={self.nnz}, "
            f"density={self.density:.3f})"
        )

    @property
    def grid(self) -> tuple[int, int]:
        """Number of blocks along K and N."""
        return self.shape[0] // self.block[0], self.shape[1] // self.block[1]

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) blocks."""
        return int(self.rows.shape[0])

    @property
    def density(self) -> float:
        """Fraction of blocks stored."""
        nk, nn = self.grid
        return self.nnz / (nk * nn)

    @cached_property
    def col_ptr(self) -> np.ndarray:
        """(nn + 1,) offsets: blocks of output block-column j are ``col_ptr[j]:col_ptr[j+1]``."""
        counts = np.bincount(self.cols, minlength=self.grid[1])
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)

    @cached_property
    def max_per_col(self) -> int:
        """Largest number of stored blocks in one block-column (at least 1)."""
        return max(1, int(np.diff(self.col_ptr).max(initial=0)))

    @cached_property
    def transpose_perm(self) -> np.ndarray:
        """Permutation taking CSC-ordered blocks to the CSC order of ``W.T`` (CSR of W)."""
        return np.lexsort((self.cols, self.rows)).astype(np.int32)

    @cached_property
    def transposed(self) -> BSRLayout:
        """Layout of ``W.T`` (shape ``(N, K)``, block ``(bn, bk)``)."""
        p = self.transpose_perm
        return BSRLayout(
            shape=(self.shape[1], self.shape[0]),
            block=(self.block[1], self.block[0]),
            rows=self.cols[p].astype(np.int32),
            cols=self.rows[p].astype(np.int32),
        )

    def mask(self) -> np.ndarray:
        """Boolean ``(nk, nn)`` block mask."""
        m = np.zeros(self.grid, bool)
        m[self.rows, self.cols] = True
        return m


def check_block(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Validate a ``(bk, bn)`` block against a 2-D ``(K, N)`` shape."""
    if len(shape) != 2:
        raise ValueError(f"w must be 2-D (K, N), got shape {tuple(shape)}")
    if len(block) != 2 or any(int(b) < 1 for b in block):
        raise ValueError(f"block must be two positive ints (bk, bn), got {block!r}")
    bk, bn = int(block[0]), int(block[1])
    if shape[0] % bk or shape[1] % bn:
        raise ValueError(
            f"w shape {tuple(shape)} is not divisible by block {(bk, bn)}: K % bk and N % bn "
            "must be 0"
        )
    return bk, bn


@jax.tree_util.register_pytree_node_class
class BSRMatrix:
    """Packed non-zero blocks (``values``: ``(nnz, bk, bn)``) plus a static :class:`BSRLayout`.

    A pytree whose only leaf is ``values``; the layout travels as static auxiliary data, so
    ``jax.jit`` retraces once per distinct layout (i.e. once per mask update).
    """

    def __init__(self, values: jax.Array, layout: BSRLayout):
        self.values = values
        self.layout = layout

    def tree_flatten(self):
        return (self.values,), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(children[0], layout)

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.shape

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def block(self) -> tuple[int, int]:
        return self.layout.block

    @classmethod
    def from_dense(cls, w, block: tuple[int, int] = (128, 128)) -> BSRMatrix:
        """Pack a dense ``(K, N)`` array on the host, dropping all-zero ``block`` tiles."""
        w_np = np.asarray(w)
        bk, bn = check_block(w_np.shape, block)
        nk, nn = w_np.shape[0] // bk, w_np.shape[1] // bn
        tiles = w_np.reshape(nk, bk, nn, bn).transpose(2, 0, 1, 3)  # (nn, nk, bk, bn)
        nonzero = np.any(tiles != 0, axis=(2, 3))  # (nn, nk)
        cols, rows = np.nonzero(nonzero)  # CSC order: sorted by column, then row
        layout = BSRLayout(
            (int(w_np.shape[0]), int(w_np.shape[1])),
            (bk, bn),
            rows.astype(np.int32),
            cols.astype(np.int32),
        )
        return cls(jnp.asarray(tiles[cols, rows]), layout)

    @classmethod
    def from_mask(cls, w, block_mask, block: tuple[int, int]) -> BSRMatrix:
        """Pack the blocks of ``w`` selected by a boolean ``(nk, nn)`` block mask (kept even
        when their values are zero, e.g. freshly initialised trainable blocks)."""
        w_np = np.asarray(w)
        bk, bn = check_block(w_np.shape, block)
        nk, nn = w_np.shape[0] // bk, w_np.shape[1] // bn
        bm = np.asarray(block_mask, bool)
        if bm.shape != (nk, nn):
            raise ValueError(f"block_mask must have shape {(nk, nn)}, got {bm.shape}")
        cols, rows = np.nonzero(bm.T)
        tiles = w_np.reshape(nk, bk, nn, bn).transpose(0, 2, 1, 3)[rows, cols]
        shape = (int(w_np.shape[0]), int(w_np.shape[1]))
        layout = BSRLayout(shape, (bk, bn), rows.astype(np.int32), cols.astype(np.int32))
        return cls(jnp.asarray(tiles), layout)

    def to_dense(self) -> jax.Array:
        """Scatter the packed blocks back into a dense ``(K, N)`` array."""
        return layout_to_dense(self.values, self.layout)

    def transpose(self) -> BSRMatrix:
        """``W.T`` as a BSRMatrix (blocks transposed and reordered to the transposed layout)."""
        perm = self.layout.transpose_perm
        return BSRMatrix(jnp.swapaxes(self.values[perm], 1, 2), self.layout.transposed)

    def nbytes(self) -> int:
        """Bytes of packed values plus int32 index tables (rows, col_ptr)."""
        lay = self.layout
        return int(self.values.size * self.values.dtype.itemsize + 4 * (lay.nnz + lay.grid[1] + 1))

    def dense_nbytes(self) -> int:
        return int(self.shape[0] * self.shape[1] * self.values.dtype.itemsize)

    def __repr__(self) -> str:
        lay = self.layout
        return (
            f"BSRMatrix(shape={lay.shape}, block={lay.block}, nnz_blocks={lay.nnz}, "
            f"density={lay.density:.3f}, dtype={self.values.dtype})"
        )


@functools.partial(jax.jit, static_argnums=(1,))
def layout_to_dense(values: jax.Array, layout: BSRLayout) -> jax.Array:
    """Dense ``(K, N)`` array with ``values`` placed at the blocks of ``layout``."""
    nk, nn = layout.grid
    bk, bn = layout.block
    tiles = jnp.zeros((nk, nn, bk, bn), values.dtype)
    if layout.nnz:
        tiles = tiles.at[layout.rows, layout.cols].set(values)
    return tiles.transpose(0, 2, 1, 3).reshape(layout.shape)


# A layout is static: as a pytree it has no leaves (it travels in the treedef), so it can sit
# inside an ``nnx.Variable`` or any pytree passed through ``jax.jit``.
jax.tree_util.register_pytree_node(BSRLayout, lambda lay: ((), lay), lambda lay, _: lay)
