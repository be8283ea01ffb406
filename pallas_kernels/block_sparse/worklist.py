"""Flat work list for the TPU BSR kernel (host-side metadata, megablox-style).

Megablox's grouped matmul (``jax.experimental.pallas.ops.tpu.megablox.gmm``) scalar-prefetches
metadata that maps each grid step to the (group, tile) it works on, so the grid has exactly as
many steps as there is work. Here the same idea drives a block-sparse ``x @ W``: one grid
step per stored block, in CSC order (output block-column by block-column), plus one step per
*empty* block-column (it has no block to multiply but its output tile must still be written
with zeros). The previous design ran ``max_per_col`` steps for every block-column, padding
each column to the longest; on a 768x3072 layer at 10% block density that is several times
the stored blocks (see ``tests/test_kernels_tiling.py`` for a hand-counted case).

Each step carries: ``block`` (index into the packed values), ``xrow`` (the K block-row of
``x`` it reads), ``col`` (the output block-column it accumulates into) and ``flags``
(:data:`FIRST`: zero the accumulator; :data:`LAST`: write the output tile; :data:`VALID`:
multiply). Steps of one column are consecutive, so the output tile stays resident in VMEM
between them; an empty column's step repeats the previous step's block and row, so nothing
new is fetched.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pallas_kernels.block_sparse.format import BSRLayout

FIRST, LAST, VALID = 1, 2, 4


class WorkItems(NamedTuple):
    """Per-step metadata, each ``(steps,)`` int32."""

    block: np.ndarray
    xrow: np.ndarray
    col: np.ndarray
    flags: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.block.shape[0])


def work_items(layout: BSRLayout) -> WorkItems:
    """The flat work list of ``layout``: ``nnz + (empty block-columns)`` steps."""
    ptr = layout.col_ptr
    block, col, flags = [], [], []
    last_block = 0
    for j in range(layout.grid[1]):
        lo, hi = int(ptr[j]), int(ptr[j + 1])
        if lo == hi:
            block.append(last_block)
            col.append(j)
            flags.append(FIRST | LAST)
        for z in range(lo, hi):
            block.append(z)
            col.append(j)
            flags.append(VALID | (FIRST if z == lo else 0) | (LAST if z == hi - 1 else 0))
            last_block = z
    rows = np.asarray(layout.rows, np.int32)
    blocks = np.asarray(block, np.int32)
    xr = rows[blocks] if layout.nnz else np.zeros_like(blocks)
    return WorkItems(blocks, xr.astype(np.int32), np.asarray(col, np.int32),
                     np.asarray(flags, np.int32))


def padded_steps(layout: BSRLayout) -> int:
    """Grid steps per row tile of the padded design: every column padded to the longest."""
    return layout.grid[1] * layout.max_per_col


__all__ = ["FIRST", "LAST", "VALID", "WorkItems", "padded_steps", "work_items"]
