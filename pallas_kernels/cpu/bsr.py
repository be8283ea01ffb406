"""Fast CPU path for block-sparse matmul (no interpreter).

The forward product runs the native micro-kernel (``native.py``, an XLA FFI custom call)
when numba is available and the block width is a multiple of 16; measured 5.1-8.6x faster
than dense at 90% block sparsity where these XLA ops reach 2.3-6.4x. Otherwise it runs as XLA
ops: because the block layout is static host metadata, the product unrolls into one small
GEMM per stored block on static column slices of ``x``, summed per output block-column, with
no gather, scatter or padding. Measured against gather/segment-sum and padded batched-einsum
variants, this was the fastest XLA formulation on CPU; cost scales with the stored blocks.

Its limit is XLA:CPU's small-GEMM rate ((2048x64)@(64x64) runs at ~55 GFLOP/s against ~150 for
a dense 2048^3 product on 2 cores). Also measured and slower: one GEMM per input block-row
against its concatenated blocks (fast products, 4-8x, but summing the pieces per output
column runs at ~5 GB/s whether written as concatenation, dynamic_update_slice, .at[].add or
M-tiles in lax.map), per-column concatenation along K, gathers, the transposed layout, and
host callbacks into OpenBLAS (numpy, scipy sgemm with beta=1, numba prange).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import native
from pallas_kernels.block_sparse.format import BSRLayout


def bsr_matmul_cpu(x: jax.Array, values: jax.Array, layout: BSRLayout) -> jax.Array:
    """``x (M, K) @ W (K, N)`` for ``W`` given by packed ``values`` and static ``layout``:
    the native kernel where it applies, else :func:`bsr_matmul_xla`."""
    if native.supports(layout.block[1]):
        return native.bsr_matmul_native(x, values, layout)
    return bsr_matmul_xla(x, values, layout)


def bsr_matmul_xla(x: jax.Array, values: jax.Array, layout: BSRLayout) -> jax.Array:
    """The product as XLA ops: one small GEMM per stored block, summed per block-column."""
    bk, bn = layout.block
    nn = layout.grid[1]
    ptr = layout.col_ptr
    outs = []
    for j in range(nn):
        acc = None
        for z in range(int(ptr[j]), int(ptr[j + 1])):
            r = int(layout.rows[z])
            part = jnp.dot(
                x[:, r * bk : (r + 1) * bk], values[z], preferred_element_type=jnp.float32
            )
            acc = part if acc is None else acc + part
        outs.append(jnp.zeros((x.shape[0], bn), jnp.float32) if acc is None else acc)
    return jnp.concatenate(outs, axis=1).astype(x.dtype)


def sddmm_cpu(x: jax.Array, dy: jax.Array, layout: BSRLayout) -> jax.Array:
    """Blocks of ``x.T @ dy`` at the stored positions only, ``(nnz, bk, bn)``, as XLA ops (the
    native SDDMM, ``native.sddmm_native``, serves blocks whose sides are multiples of 16)."""
    bk, bn = layout.block
    if layout.nnz == 0:
        return jnp.zeros((0, bk, bn), x.dtype)
    blocks = []
    for r, c in zip(layout.rows.tolist(), layout.cols.tolist(), strict=True):
        xs = x[:, r * bk : (r + 1) * bk]
        ds = dy[:, c * bn : (c + 1) * bn]
        blocks.append(
            jax.lax.dot_general(
                xs, ds, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
        )
    return jnp.stack(blocks).astype(x.dtype)
