"""``bsr_matmul``: block-sparse ``x @ W`` with a ``jax.custom_vjp`` and backend dispatch.

Backward (Pallas has no autodiff): ``dX = dY @ W.T`` runs the forward kernel on the
transposed layout, and ``dW`` is computed only for the stored blocks (sampled dense-dense
matmul, SDDMM), so pruned blocks never receive gradient. Method: Gray, Radford & Kingma,
"GPU Kernels for Block-Sparse Weights" (2017).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backend import BACKENDS, check_operand, resolve_backend
from pallas_kernels.block_sparse import kernel as K
from pallas_kernels.block_sparse.format import BSRLayout, BSRMatrix, layout_to_dense
from pallas_kernels.block_sparse.reference import bsr_product, sddmm_reference
from pallas_kernels.block_sparse.tiles import BSRTiles, choose_tiles, dw_plan
from pallas_kernels.cpu import native
from pallas_kernels.cpu.bsr import bsr_matmul_xla, sddmm_xla
from pallas_kernels.roofline import DEVICES, Device, device_for_kind

# The two CPU paths, which "cpu" chooses between; named, they force one.
CPU_PATHS = ("cpu_native", "cpu_xla")
# "auto" on CPU: the native kernels wherever they run (benchmarks/kernels.py: 1.0-1.3x of a
# dense GEMM even at 0% block sparsity); else the unrolled XLA path only where it beats a dense
# GEMM (~1x at 50% block density) and where unrolling stays cheap to compile.
CPU_MAX_DENSITY = 0.5
CPU_MAX_BLOCKS = 4096


def cpu_path() -> str:
    """The CPU path ``backend="cpu"`` takes here: ``"cpu_native"`` where the native kernels
    run (:func:`pallas_kernels.cpu.native.unavailable_reason`), else ``"cpu_xla"``."""
    return "cpu_xla" if native.unavailable_reason() else "cpu_native"


def check_compiled_block(impl: str, block: tuple[int, int]) -> None:
    """Blocks the compiled kernels accept: Triton loads need power-of-2 tiles of at least 16
    (``tl.dot``); Mosaic TPU tiles need the lane (last) dims to be multiples of 128."""
    bk, bn = block
    if impl == "gpu" and not all(b >= 16 and b & (b - 1) == 0 for b in (bk, bn)):
        raise ValueError(f"block must be powers of 2 >= 16 for the GPU kernel, got {block}")
    if impl == "tpu" and (bk % 128 or bn % 128):
        raise ValueError(f"block must be multiples of 128 for the TPU kernel, got {block}")


def _row_tile(m: int, tiles: BSRTiles) -> BSRTiles:
    """``tiles`` with ``bm`` shrunk to a power of 2 >= 16 covering ``m`` when ``m < bm``."""
    if m >= tiles.bm:
        return tiles
    return dataclasses.replace(tiles, bm=max(16, 1 << (m - 1).bit_length()))


def _tiles(impl: str, m: int, layout: BSRLayout, itemsize: int, tiles: BSRTiles | None):
    """Explicit ``tiles`` (``bm`` clamped to ``m``; ``cols`` to a divisor of the block-columns)
    or the shape's choice (:func:`pallas_kernels.block_sparse.tiles.choose_tiles`)."""
    if tiles is None:
        return choose_tiles(impl, m, layout.shape[1], layout.block, itemsize)
    nn, cols = layout.grid[1], max(1, min(tiles.cols, layout.grid[1]))
    while nn % cols:
        cols -= 1
    return dataclasses.replace(_row_tile(m, tiles), cols=cols)


def _device() -> Device:
    """Roofline figures of the default device; an H100's where unknown (CPU, interpret)."""
    return device_for_kind(jax.devices()[0].device_kind) or DEVICES["h100"]


def _pad_rows(a: jax.Array, bm: int) -> jax.Array:
    pad = (-a.shape[0]) % bm
    return a if pad == 0 else jnp.pad(a, ((0, pad), (0, 0)))


def _dense(x, values, layout: BSRLayout):
    """Densify + one GEMM where every entry of ``x`` is finite (then ``0 * x`` is exactly 0,
    so the result is the block-sparse one), else :func:`bsr_product`."""

    def gemm(x, values):
        w = layout_to_dense(values, layout)
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

    return jax.lax.cond(
        jnp.isfinite(x).all(), gemm, lambda x, v: bsr_product(x, v, layout), x, values
    )


def _forward(x, values, layout: BSRLayout, impl: str, tiles: BSRTiles | None):
    m = x.shape[0]
    if layout.nnz == 0:
        return jnp.zeros((m, layout.shape[1]), x.dtype)
    if impl == "reference":
        return bsr_product(x, values, layout)
    if impl == "dense":
        return _dense(x, values, layout)
    if impl == "cpu_native" and native.fits(layout.block[1]):
        return native.bsr_matmul_native(x, values, layout)
    if impl in CPU_PATHS:
        return bsr_matmul_xla(x, values, layout)
    t = _tiles(impl, m, layout, x.dtype.itemsize, tiles)
    fn = K.bsr_matmul_prefetch if impl.endswith("tpu") else K.bsr_matmul_gpu
    y = fn(_pad_rows(x, t.bm), values, layout=layout, tiles=t, interpret=impl.startswith("int"))
    return y[:m]


def _sddmm(x, dy, layout: BSRLayout, impl: str, tiles: BSRTiles | None):
    bk, bn = layout.block
    if layout.nnz == 0:
        return jnp.zeros((0, bk, bn), x.dtype)
    if impl in ("reference", "dense"):
        return sddmm_reference(x, dy, layout)
    if impl == "cpu_native" and native.fits(*layout.block):
        return native.sddmm_native(x, dy, layout)
    if impl in CPU_PATHS:
        return sddmm_xla(x, dy, layout)
    m, k = x.shape
    interpret = impl.startswith("int")
    if impl.endswith("tpu"):
        t = (_row_tile(m, tiles) if tiles is not None
             else choose_tiles(impl, m, bn, (bk, bn), x.dtype.itemsize))
        return K.sddmm_prefetch(_pad_rows(x, t.bm), _pad_rows(dy, t.bm), layout=layout, tiles=t,
                                interpret=interpret)
    t = _tiles(impl, m, layout, x.dtype.itemsize, tiles)
    path, splits = _dw_path(m, layout, x.dtype.itemsize, t)
    if path == "dense":  # too few stored blocks to fill the device: one dense GEMM, gathered
        return sddmm_reference(x, dy, layout)
    splits = max(1, min(splits, -(-m // t.bm)))
    rows = t.bm * splits
    return K.sddmm_gpu(_pad_rows(x, rows), _pad_rows(dy, rows), layout=layout, tiles=t,
                       splits=splits, interpret=interpret)


def _dw_path(m: int, layout: BSRLayout, itemsize: int, t: BSRTiles) -> tuple[str, int]:
    """``(path, splits)`` for the GPU dW: forced by ``t.dw``/``t.splits``, else
    :func:`pallas_kernels.block_sparse.tiles.dw_plan` on the default device's figures."""
    if t.dw not in ("auto", "split", "dense"):
        raise ValueError(f"tiles.dw must be 'auto', 'split' or 'dense', got {t.dw!r}")
    plan = dw_plan(m, *layout.shape, layout.block, layout.nnz, itemsize, _device())
    path = plan.path if t.dw == "auto" else t.dw
    return path, t.splits or plan.splits


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bsr(x, values, layout, impl, tiles):
    return _forward(x, values, layout, impl, tiles)


def _bsr_fwd(x, values, layout, impl, tiles):
    return _forward(x, values, layout, impl, tiles), (x, values)


def _bsr_bwd(layout, impl, tiles, res, g):
    x, values = res
    g = g.astype(x.dtype)
    values_t = jnp.swapaxes(values[layout.transpose_perm], 1, 2)
    dx = _forward(g, values_t, layout.transposed, impl, tiles)
    dv = _sddmm(x, g, layout, impl, tiles).astype(values.dtype)
    return dx, dv


_bsr.defvjp(_bsr_fwd, _bsr_bwd)
# Jitted entry (static layout/backend/tiles), so eager calls compile once per layout.
_bsr_jit = jax.jit(_bsr, static_argnums=(2, 3, 4))


def _resolve(backend: str, w: BSRMatrix) -> str:
    """The implementation a backend name runs for ``w`` (see :func:`bsr_matmul`)."""
    if backend == "cpu_native":
        reason = native.unavailable_reason()
        if reason:
            raise ValueError(f"backend='cpu_native': {reason}; use backend='cpu'")
        return backend
    if backend == "cpu_xla":
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + CPU_PATHS}, got {backend!r}")
    impl = resolve_backend(backend)
    if impl == "cpu":
        impl = cpu_path()
        if backend == "auto" and not (impl == "cpu_native" and native.fits(*w.block)):
            dense = w.layout.density > CPU_MAX_DENSITY or w.layout.nnz > CPU_MAX_BLOCKS
            impl = "dense" if dense else "cpu_xla"  # dense: faster here, quick to compile
    try:
        check_compiled_block(impl, w.block)
    except ValueError:
        if backend != "auto":
            raise
        impl = "dense"  # "auto" with tiles the compiled kernel cannot take
    return impl


def bsr_matmul(
    x: jax.Array, w: BSRMatrix, *, backend: str = "auto", tiles: BSRTiles | None = None
) -> jax.Array:
    """Block-sparse ``x @ W`` for ``x`` of shape ``(..., K)`` and ``W`` a ``(K, N)`` BSRMatrix.

    Blocks that are not stored are structural zeros, as in other sparse libraries: they
    contribute nothing, so a NaN or inf in ``x`` reaches only the output columns with a stored
    block in its block-row (a dense ``x @ w.to_dense()`` would put NaN in every column, since
    ``inf * 0`` is NaN). Every backend computes this.

    ``backend``: ``"auto"`` (on CPU the native kernels for blocks that are multiples of 16,
    else the XLA-ops path or, above 50% block density, densify + GEMM guarded by an
    all-finite check on ``x``; the Pallas kernel on GPU/TPU), ``"pallas"`` (compiled kernel:
    Triton on GPU, Mosaic on TPU), ``"interpret"`` (TPU-style kernel in Pallas interpret
    mode), ``"interpret_gpu"`` (GPU-style kernel interpreted), ``"cpu"`` (the native kernels
    where they run -- numba, AVX-512F, a jaxlib whose FFI header matches -- else the XLA-ops
    path; ``"cpu_native"`` and ``"cpu_xla"`` force one of the two) or ``"reference"``.
    Differentiable in ``x`` and ``w.values``.

    ``tiles``: the Pallas kernels' tile sizes; ``None`` (default) chooses them by shape
    (:mod:`pallas_kernels.block_sparse.tiles`), an explicit :class:`BSRTiles` overrides.
    """
    if not isinstance(w, BSRMatrix):
        raise ValueError(f"w must be a BSRMatrix, got {type(w).__name__}")
    impl = _resolve(backend, w)
    k, n = w.shape
    check_operand(x, w.shape, w.values.dtype)
    lead = x.shape[:-1]
    y = _bsr_jit(x.reshape(-1, k), w.values, w.layout, impl, tiles)
    return y.reshape(*lead, n)
