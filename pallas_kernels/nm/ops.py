"""``nm_matmul``: N:M sparse ``x @ W`` with in-kernel decompression and a ``custom_vjp``.

Scope: the Pallas kernel saves weight *bytes*, not FLOPs (no sparse tensor-core MMA in
Pallas; see ``kernel.py``), so ``backend="auto"`` on GPU/TPU runs it only where the roofline
says it wins (:func:`kernel_wins`: memory-bound shapes, i.e. small ``M``) and the shape
tiles for it; everywhere else it takes the dense-masked path (decompress + one dense GEMM,
the CPU path's code), a documented choice, not an error.

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
from pallas_kernels.roofline import DEVICES, SPARSE_EFFICIENCY, Device, device_for_kind


def kernel_tiles(shape: tuple[int, int], n: int, m: int, m_rows: int, tiles: K.NMTiles):
    """``(gt, bn, bm)``: groups per K tile, output columns per tile, rows per tile."""
    k, cols = shape
    g = k // m
    _, per, _ = code_layout(g, n, m)
    gt = math.gcd(g // per, tiles.groups)
    bn = math.gcd(cols, tiles.bn)
    bm = tiles.bm if m_rows >= tiles.bm else max(16, 1 << (m_rows - 1).bit_length())
    return gt, bn, bm


def tiling_error(impl: str, shape: tuple[int, int], n: int, m: int, tiles: K.NMTiles) -> str:
    """Why the compiled kernel cannot tile ``shape`` (``""`` if it can)."""
    gt, bn, _ = kernel_tiles(shape, n, m, tiles.bm, tiles)
    g = shape[0] // m
    per = code_layout(g, n, m)[1]
    if impl == "gpu" and (gt < 16 or bn < 16 or gt & (gt - 1) or bn & (bn - 1)):
        return (
            f"the GPU N:M kernel needs K/m/P = {g // per} and N = {shape[1]} to have power-of-2 "
            f"factors >= 16 (tiles {gt}x{bn}); use backend='auto', 'cpu' or 'reference'"
        )
    if impl == "tpu" and (gt % 128 or bn % 128):
        return (
            f"the TPU N:M kernel needs 128-multiples: groups/tile {gt} (K/m/P = {g // per}), "
            f"columns/tile {bn} (N = {shape[1]}); use backend='auto' or 'reference'"
        )
    return ""


def kernel_wins(m_rows: int, shape: tuple[int, int], n: int, m: int, itemsize: int,
                device: Device, platform: str) -> bool:
    """The ``auto`` rule: does the compressed kernel beat the dense-masked path?

    Both do ``2 M K N`` dense FLOPs (the kernel at :data:`SPARSE_EFFICIENCY` of the peak).
    Kernel bytes: ``x``, the output, the kept values (``n/m`` of ``W``) and the codes, plus on
    TPU ``x`` rewritten plane-split (read and written once). Dense-masked bytes: decompress
    (read compressed, write dense ``W``), then a dense GEMM (``x``, ``W``, output). Times are
    ``max(flops / peak, bytes / bandwidth)`` (decompression: bytes only); the kernel wins if
    strictly faster, which on a GPU or TPU means memory-bound, i.e. small ``M``.
    """
    k, cols = shape
    flops = 2.0 * m_rows * k * cols
    io = (m_rows * k + m_rows * cols) * itemsize
    w_dense = k * cols * itemsize
    bits = code_layout(k // m, n, m)[0]
    w_kept = w_dense * n / m + (k // m) * cols * n * bits / 8  # values + codes
    kernel_bytes = io + w_kept + (2 * m_rows * k * itemsize if platform == "tpu" else 0)
    kernel_s = max(flops / (device.peak_flops * SPARSE_EFFICIENCY),
                   kernel_bytes / device.bandwidth)
    dense_s = max(flops / device.peak_flops, (io + w_dense) / device.bandwidth)
    dense_s += (w_kept + w_dense) / device.bandwidth
    return kernel_s < dense_s


def _kernel_call(x, values, codes, shape, n, m, impl, tiles: K.NMTiles):
    mm = x.shape[0]
    k, cols = shape
    g = k // m
    bits, per, _ = code_layout(g, n, m)
    reason = tiling_error(impl, shape, n, m, tiles)
    if reason:
        raise ValueError(reason)
    gt, bn, bm = kernel_tiles(shape, n, m, mm, tiles)
    pad = (-mm) % bm
    xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    common = dict(n=n, m=m, bits=bits, per=per, gt=gt, bm=bm, bn=bn)
    interpret = impl.startswith("int")
    if impl.endswith("tpu"):
        # Mosaic BlockSpecs take contiguous tiles: split K as (G, m) -> (m, G) once, so
        # plane r of every tile is a contiguous column slice (2 M K bytes, in kernel_wins).
        x2 = xp.reshape(mm + pad, g, m).transpose(0, 2, 1).reshape(mm + pad, k)
        y = K.nm_matmul_blocked(x2, values, codes, interpret=interpret, **common)
    else:  # Triton: strided loads read the planes of x in place
        y = K.nm_matmul_gpu(xp, values, codes, num_warps=tiles.num_warps,
                            num_stages=tiles.num_stages, interpret=interpret, **common)
    return y[:mm]


def _forward(x, values, codes, shape, n, m, impl, tiles):
    if impl == "reference":
        w = NMMatrix(values, codes, shape, n, m).to_dense()
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    if impl in ("cpu", "dense"):  # dense-masked: decompress + one GEMM
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

    ``backend`` as in :func:`pallas_kernels.backend.resolve_backend`, except that ``"auto"``
    on GPU/TPU runs the Pallas kernel only where :func:`kernel_wins` and the shape tiles
    for it (on TPU, K/m/P and N multiples of 128), else the dense-masked path (decompress +
    dense GEMM). Differentiable in ``x`` and ``w.values`` (``w.codes`` are integer metadata).
    """
    if not isinstance(w, NMMatrix):
        raise ValueError(f"w must be an NMMatrix, got {type(w).__name__}")
    impl = resolve_backend(backend)
    k, cols = w.shape
    check_operand(x, w.shape, w.values.dtype)
    lead = x.shape[:-1]
    if backend == "auto" and impl in ("gpu", "tpu"):
        rows = math.prod(lead)
        tiles_ = tiles or K.NMTiles()
        device = device_for_kind(jax.devices()[0].device_kind) or DEVICES["h100"]
        fits = not tiling_error(impl, w.shape, w.n, w.m, tiles_)
        wins = kernel_wins(rows, w.shape, w.n, w.m, x.dtype.itemsize, device, impl)
        impl = impl if fits and wins else "dense"
    y = _nm_jit(x.reshape(-1, k), w.values, w.codes, w.shape, w.n, w.m, impl, tiles or K.NMTiles())
    return y.reshape(*lead, cols)
