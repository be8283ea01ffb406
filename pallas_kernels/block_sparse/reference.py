"""Pure-``jnp`` references for block-sparse matmul and its sampled (SDDMM) gradient.

Independent of the kernels: the packed blocks are scattered into a dense matrix and an
ordinary ``jnp.dot`` is used. These also serve as ground truth in the tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse.format import BSRLayout, BSRMatrix, layout_to_dense


def bsr_matmul_reference(x: jax.Array, w: BSRMatrix) -> jax.Array:
    """``x @ w.to_dense()`` with float32 accumulation, cast back to ``x.dtype``."""
    dense = w.to_dense()
    y = jnp.dot(x, dense, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def sddmm_reference(x: jax.Array, dy: jax.Array, layout: BSRLayout) -> jax.Array:
    """Sampled dense-dense matmul: the blocks of ``x.T @ dy`` present in ``layout``.

    Returns ``(nnz, bk, bn)`` in the layout's (CSC) order; ``x``: ``(M, K)``, ``dy``: ``(M, N)``.
    """
    full = jnp.dot(x.T, dy, preferred_element_type=jnp.float32)
    nk, nn = layout.grid
    bk, bn = layout.block
    tiles = full.reshape(nk, bk, nn, bn).transpose(0, 2, 1, 3)
    return tiles[layout.rows, layout.cols].astype(x.dtype)


__all__ = ["bsr_matmul_reference", "sddmm_reference", "layout_to_dense"]
