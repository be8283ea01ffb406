"""Pure-``jnp`` references for block-sparse matmul and its sampled (SDDMM) gradient.

Independent of the kernels, and with their semantics: blocks that are not stored are
structural zeros and contribute nothing, so a NaN or inf in ``x`` reaches only the output
columns that have a stored block in its block-row (``x @ w.to_dense()`` would spread it to
every column through ``inf * 0``). These also serve as ground truth in the tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse.format import BSRLayout, BSRMatrix, layout_to_dense


def bsr_product(x: jax.Array, values: jax.Array, layout: BSRLayout) -> jax.Array:
    """``x (M, K) @ W`` over the stored blocks only: one product per block, summed per
    block-column (float32 accumulation, result in ``x.dtype``)."""
    m = x.shape[0]
    (nk, nn), (bk, bn) = layout.grid, layout.block
    if layout.nnz == 0:
        return jnp.zeros((m, layout.shape[1]), x.dtype)
    xs = x.reshape(m, nk, bk)[:, layout.rows]  # (M, nnz, bk)
    parts = jnp.einsum("mzk,zkn->zmn", xs, values, preferred_element_type=jnp.float32)
    y = jax.ops.segment_sum(parts, layout.cols, num_segments=nn, indices_are_sorted=True)
    return y.transpose(1, 0, 2).reshape(m, nn * bn).astype(x.dtype)


def bsr_matmul_reference(x: jax.Array, w: BSRMatrix) -> jax.Array:
    """``x (..., K) @ W`` over the stored blocks of ``w`` (see :func:`bsr_product`)."""
    y = bsr_product(x.reshape(-1, w.shape[0]), w.values, w.layout)
    return y.reshape(*x.shape[:-1], w.shape[1])


def sddmm_reference(x: jax.Array, dy: jax.Array, layout: BSRLayout) -> jax.Array:
    """Sampled dense-dense matmul: the blocks of ``x.T @ dy`` present in ``layout``.

    Returns ``(nnz, bk, bn)`` in the layout's (CSC) order; ``x``: ``(M, K)``, ``dy``: ``(M, N)``.
    """
    full = jnp.dot(x.T, dy, preferred_element_type=jnp.float32)
    nk, nn = layout.grid
    bk, bn = layout.block
    tiles = full.reshape(nk, bk, nn, bn).transpose(0, 2, 1, 3)
    return tiles[layout.rows, layout.cols].astype(x.dtype)


__all__ = ["bsr_matmul_reference", "bsr_product", "sddmm_reference", "layout_to_dense"]
