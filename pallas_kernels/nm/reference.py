"""Pure-``jnp`` reference for N:M matmul: scatter to dense (``NMMatrix.to_dense``), then dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.nm.format import NMMatrix


def nm_matmul_reference(x: jax.Array, w: NMMatrix) -> jax.Array:
    """``x @ w.to_dense()`` with float32 accumulation, cast back to ``x.dtype``."""
    y = jnp.dot(x, w.to_dense(), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
