"""CPU path for N:M matmul: decompress with compares/selects (fused by XLA) and one GEMM.

On CPUs there is no N:M hardware, so the fastest exact path is the dense GEMM on a
decompressed tile-free matrix; the decompression is elementwise and fuses into one pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.nm.format import unpack_indices


def decompress(
    values: jax.Array, codes: jax.Array, shape: tuple[int, int], n: int, m: int
) -> jax.Array:
    """Dense ``(K, N)`` matrix from plane-major ``values`` and packed ``codes``."""
    k, cols = shape
    g = k // m
    idx = unpack_indices(codes, n, m, g)  # (n, g, cols)
    vals = values.reshape(n, g, cols)
    planes = []
    for r in range(m):
        plane = jnp.zeros((g, cols), values.dtype)
        for t in range(n):
            plane = jnp.where(idx[t] == r, vals[t], plane)
        planes.append(plane)
    return jnp.stack(planes, axis=1).reshape(k, cols)


def nm_matmul_cpu(
    x: jax.Array, values: jax.Array, codes: jax.Array, shape: tuple[int, int], n: int, m: int
) -> jax.Array:
    """``x (M, K) @ W`` for the compressed ``W``; float32 accumulation."""
    w = decompress(values, codes, shape, n, m)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def gather_kept(full: jax.Array, codes: jax.Array, n: int, m: int) -> jax.Array:
    """Entries of a dense ``(K, N)`` ``full`` at the kept positions, plane-major ``(K*n/m, N)``.

    Used for the weight gradient: ``dvalues = gather_kept(x.T @ dy)``.
    """
    k, cols = full.shape
    g = k // m
    idx = unpack_indices(codes, n, m, g)  # (n, g, cols)
    grouped = full.reshape(g, m, cols)
    out = [jnp.take_along_axis(grouped, idx[t][:, None, :], axis=1)[:, 0, :] for t in range(n)]
    return jnp.concatenate(out, axis=0)
