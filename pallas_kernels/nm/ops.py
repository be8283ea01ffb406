"""``nm_matmul``: N:M sparse ``x @ W`` with in-kernel decompression and a ``custom_vjp``.

Backward (no backward kernel, so pure ``jnp`` serves, as the reference does for
``jax.experimental.pallas.ops.gpu.attention.mha`` with ``backward_pass_impl="xla"``):
``dX = dY @ W.T`` with ``W`` decompressed, and ``dvalues`` = ``x.T @ dY`` read at the kept
positions only, so pruned entries never receive gradient. Method: Mishra et al., "Accelerating
Sparse Deep Neural Networks" (2021).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.backend import check_operand, resolve_backend
from pallas_kernels.cpu.nm import decompress, gather_kept, nm_matmul_cpu
from pallas_kernels.nm import kernel as K
from pallas_kernels.nm.format import NMMatrix, code_layout


def _kernel_call(x, values, codes, shape, n, m, impl, tiles: K.NMTiles):
    mm = x.shape[0]
    k, cols = shape
    g = k // m
    bits, per, _ = code_layout(g, n, m)
    gt = math.gcd(g // per, tiles.groups)
    bn = math.gcd(cols, tiles.bn)
    bm = tiles.bm if mm >= tiles.bm else max(16, 1 << (mm - 1).bit_length())
    if impl == "gpu" and (gt < 16 or bn < 16):
        raise ValueError(
            f"the GPU N:M kernel needs K/m/P = {g // per} and N = {cols} to have power-of-2 "
            f"factors >= 16 (tiles {gt}x{bn}); use backend='cpu' or 'reference' for this shape"
        )
    if impl == "tpu" and (gt % 128 or bn % 128):
        raise ValueError(
            f"the TPU N:M kernel needs 128-multiples: groups/tile {gt}, columns/tile {bn}; "
            "use larger K and N or backend='reference'"
        )
    pad = (-mm) % bm
    xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    # Split K as (G, m) -> (m, G): plane r of every tile becomes a contiguous column slice.
    x2 = xp.reshape(mm + pad, g, m).transpose(0, 2, 1).reshape(mm + pad, k)
    common = dict(n=n, m=m, bits=bits, per=per, gt=gt, bm=bm, bn=bn)
    if impl.endswith("tpu"):
        y = K.nm_matmul_blocked(x2, values, codes, interpret=impl.startswith("int"), **common)
    else:
        y = K.nm_matmul_gpu(
            x2,
            values,
            codes,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
            interpret=impl.startswith("int"),
            **common,
        )
    return y[:mm]


def _forward(x, values, codes, shape, n, m, impl, tiles):
    if impl == "reference":
        w = NMMatrix(values, codes, shape, n, m).to_dense()
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    if impl == "cpu":
        return nm_matmul_cpu(x, values, codes, shape, n, m)
    return _kernel_call(x, values, codes, shape, n, m, impl, tiles)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _nm(x, values, codes, shape, n, m, impl, tiles):
    return _forward(x, values, codes, shape, n, m, impl, tiles)


def _nm_fwd(x, values, codes, shape, n, m, impl, tiles):
    return _forward(x, values, codes, shape, n, m, impl, tiles), (x, values, codes)


def _nm_bwd(shape, n, m, impl, tiles, res, g):
    x, values, codes = res
    g = g.astype(x.dtype)
    w = decompress(values, codes, shape, n, m)
    dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    full = jnp.dot(x.T, g, preferred_element_type=jnp.float32)
    dv = gather_kept(full, codes, n, m).astype(values.dtype)
    return dx, dv, None


_nm.defvjp(_nm_fwd, _nm_bwd)
# Jitted entry (static shape/pattern/backend/tiles), so eager calls compile once.
_nm_jit = jax.jit(_nm, static_argnums=(3, 4, 5, 6, 7))


def nm_matmul(
    x: jax.Array, w: NMMatrix, *, backend: str = "auto", tiles: K.NMTiles | None = None
) -> jax.Array:
    """N:M sparse ``x @ W`` for ``x`` of shape ``(..., K)`` and ``W`` a ``(K, N)`` NMMatrix.

    ``backend`` as in :func:`pallas_kernels.backend.resolve_backend`. Differentiable in
    ``x`` and ``w.values`` (``w.codes`` are integer metadata).
    """
    if not isinstance(w, NMMatrix):
        raise ValueError(f"w must be an NMMatrix, got {type(w).__name__}")
    impl = resolve_backend(backend)
    k, cols = w.shape
    check_operand(x, w.shape, w.values.dtype)
    lead = x.shape[:-1]
    y = _nm_jit(x.reshape(-1, k), w.values, w.codes, w.shape, w.n, w.m, impl, tiles or K.NMTiles())
    return y.reshape(*lead, cols)
