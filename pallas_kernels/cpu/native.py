"""Native CPU kernels for block-sparse ``x @ W`` and its ``dW`` (SDDMM), as XLA custom calls.

XLA:CPU runs the small per-block GEMMs of the XLA-ops path (``bsr.py``) far below its dense
rate, so on CPU both products run register-blocked micro-kernels (``microkernel.py``), driven
by numba ``prange`` loops over independent output tiles:

* forward: tasks are (256-row tile of ``x``, output block-column); each micro-kernel call
  sums every stored block of its column in registers and writes its ``Y`` tile once (no
  gather, padding or summation pass);
* SDDMM (``dW``, Gray, Radford & Kingma, "GPU Kernels for Block-Sparse Weights", 2017): tasks
  are (stored block, column tile); each walks the batch rows in 32-row chunks, and within a
  chunk (L1-resident) runs every row tile of the block, accumulating into the output.

JAX calls them as XLA FFI custom calls (``ffi.py``), so they read and write XLA's buffers in
place; ``jax.pure_callback`` would copy operands and results (~10 ms per 16 MB here, a third
of the 90%-sparse time at M=2048). They compute in f32 (other dtypes are cast to f32 and
back), need block sides that are multiples of 16, and are compiled on first use (a few
seconds) and cached on disk in a private per-user folder (``cache.py``).

Where they run (:func:`unavailable_reason` is None): numba imports, the ABI is LP64, the CPU
has AVX-512F (the tiles keep 24 of its 32 vector registers busy; elsewhere, ARM included,
the ops take the XLA-ops path), and the running jaxlib's FFI header matches
:mod:`pallas_kernels.cpu.abi`. Measured (benchmarks/kernels.py, 2048x2048, 2 cores): forward
5.1-8.6x faster than XLA's dense dot at 90% block sparsity, 1.0-1.3x at 0%.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu import abi, cache, ffi

try:
    import numba

    from pallas_kernels.cpu.microkernel import bsr_tile, sddmm_tile
except ImportError:  # pragma: no cover - numba is a dependency; checked by ffi.available()
    numba = None

# Column tile width -> rows per forward tile (24 of the 32 vector registers hold accumulators).
# SDDMM tiles are 4x64, 8x32 or 16x16 (16 accumulators; the row counts divide any block side
# that is a multiple of 16).
TILES = {64: 6, 32: 12, 16: 24}
_ROW_TILE = 256  # rows of x per forward task: its slice of x stays in L2 across block-columns
_SDDMM_ROWS = 32  # batch rows per SDDMM step
_BSR_TARGET = "sparsejax_bsr_matmul_f32"
_SDDMM_TARGET = "sparsejax_bsr_sddmm_f32"


@functools.cache
def host_has_avx512() -> bool:
    """Whether this CPU has AVX-512F (from LLVM's host feature list, as numba compiles for)."""
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx512f", False))


def unavailable_reason() -> str | None:
    """Why the native kernels do not run here (None: they do). The first call where the
    checks pass compiles and registers the kernels; a jaxlib whose FFI header differs from
    the handlers' layout, or that refuses them, is reported once, as a warning."""
    if not ffi.available():
        return "numba is missing"
    if not host_has_avx512():
        return "the CPU has no AVX-512F (the micro-kernels are tuned for it)"
    if not abi.header_ok():
        return "the ABI is not LP64 or this jaxlib's XLA FFI header differs from the handlers'"
    return _register()


def column_tile(bn: int) -> int | None:
    """Widest micro-kernel column tile that divides ``bn`` (None: no native kernel)."""
    return next((cw for cw in TILES if bn % cw == 0), None)


def fits(*sides: int) -> bool:
    """Whether blocks with these sides suit the kernels (the forward needs the block width,
    SDDMM and the transposed backward product need both sides to be multiples of 16)."""
    return all(column_tile(b) is not None for b in sides)


if numba is not None:

    @numba.njit(inline="always")
    def _bsr_rows(x, vals, rows, z0, z1, ms, me, out, col, cc, cw):
        """Rows ``ms:me`` of one ``cw``-wide output column tile: full tiles, then single rows."""
        m = ms
        if cw == 64:
            while m + 6 <= me:
                bsr_tile(x, vals, rows, z0, z1, m, out, col, cc, 6, 4)
                m += 6
            while m < me:
                bsr_tile(x, vals, rows, z0, z1, m, out, col, cc, 1, 4)
                m += 1
        elif cw == 32:
            while m + 12 <= me:
                bsr_tile(x, vals, rows, z0, z1, m, out, col, cc, 12, 2)
                m += 12
            while m < me:
                bsr_tile(x, vals, rows, z0, z1, m, out, col, cc, 1, 2)
                m += 1
        else:
            while m + 24 <= me:
                bsr_tile(x, vals, rows, z0, z1, m, out, col, cc, 24, 1)
                m += 24
            while m < me:
                bsr_tile(x, vals, rows, z0, z1, m, out, col, cc, 1, 1)
                m += 1

    @numba.njit(parallel=True, boundscheck=False)
    def _bsr_host(x, vals, rows, col_ptr, out, cw):
        m_total = x.shape[0]
        bn = vals.shape[2]
        nn = col_ptr.shape[0] - 1
        n_tiles = (m_total + _ROW_TILE - 1) // _ROW_TILE
        for t in numba.prange(n_tiles * nn):
            j = t % nn
            ms = (t // nn) * _ROW_TILE
            me = min(m_total, ms + _ROW_TILE)
            z0, z1 = np.int64(col_ptr[j]), np.int64(col_ptr[j + 1])
            for cc in range(0, bn, cw):
                _bsr_rows(x, vals, rows, z0, z1, ms, me, out, j * bn + cc, cc, cw)

    @numba.njit(inline="always")
    def _sddmm_rows(x, dy, z, r, c, kr, cc, m0, m1, out, cw):
        """Add batch rows ``m0:m1`` into one row tile of one stored block (literal tile sizes)."""
        if cw == 64:
            sddmm_tile(x, dy, z, r, c, kr, cc, m0, m1, out, 4, 4)
        elif cw == 32:
            sddmm_tile(x, dy, z, r, c, kr, cc, m0, m1, out, 8, 2)
        else:
            sddmm_tile(x, dy, z, r, c, kr, cc, m0, m1, out, 16, 1)

    @numba.njit(parallel=True, boundscheck=False)
    def _sddmm_host(x, dy, rows, cols, out, cw):
        m_total = x.shape[0]
        nnz, bk, bn = out.shape
        mr = 4 if cw == 64 else (8 if cw == 32 else 16)
        n_chunks = bn // cw
        for t in numba.prange(nnz * n_chunks):
            z = np.int64(t // n_chunks)
            cc = (t % n_chunks) * cw
            r, c = np.int64(rows[z]), np.int64(cols[z])
            out[z, :, cc : cc + cw] = 0.0
            # Batch rows in chunks whose x and dy slices stay in L1 across the row tiles.
            for m0 in range(0, m_total, _SDDMM_ROWS):
                m1 = min(m_total, m0 + _SDDMM_ROWS)
                for kr in range(0, bk, mr):
                    _sddmm_rows(x, dy, z, r, c, kr, cc, m0, m1, out, cw)

    @numba.njit(inline="always")
    def _cw(bn):
        return 64 if bn % 64 == 0 else (32 if bn % 32 == 0 else 16)


def _check_block(block: tuple[int, int], sddmm: bool = False) -> None:
    bk, bn = block
    if column_tile(bn) is None or (sddmm and bk % 16):
        sides = "sides" if sddmm else "columns"
        raise ValueError(f"block {sides} must be multiples of 16 for the native kernel: {block}")


# What each handler checks before it runs (check code i reports message i - 1).
BSR_ERRORS = tuple(
    f"{_BSR_TARGET}: {m}"
    for m in (
        "operands must be x f32[M, K], values f32[nnz, bk, bn], rows s32[nnz], col_ptr "
        "s32[N/bn + 1]; result f32[M, N]",
        "shapes disagree or bk does not divide K, bn N, or bn is not a multiple of 16",
        "col_ptr must rise from 0 to nnz",
        "rows must index the K/bk block-rows",
    )
)
SDDMM_ERRORS = tuple(
    f"{_SDDMM_TARGET}: {m}"
    for m in (
        "operands must be x f32[M, K], dy f32[M, N], rows s32[nnz], cols s32[nnz]; result "
        "f32[nnz, bk, bn]",
        "shapes disagree or bk does not divide K, bn N, or a block side is not a multiple of 16",
        "rows and cols must index the (K/bk, N/bn) block grid",
    )
)

if numba is not None:
    _F32, _S32 = abi.DTYPE_F32, abi.DTYPE_S32
    dim = ffi.dim

    @numba.njit
    def _i32(buffer, n):
        return numba.carray(ffi.i32_pointer(ffi.data(buffer)), (n,))

    @numba.njit
    def _f32(buffer, shape):
        return numba.carray(ffi.f32_pointer(ffi.data(buffer)), shape)

    @numba.njit
    def _buffers(frame):
        """The four operand buffers and the result buffer."""
        b = ffi.buffer
        return b(frame, 0), b(frame, 1), b(frame, 2), b(frame, 3), b(frame, 4)

    @numba.njit
    def _in_range(values, hi):
        for v in values:
            if v < 0 or v >= hi:
                return False
        return True

    @numba.njit
    def _bsr_check(frame):
        """0 if the forward kernel can run on the frame's buffers, else a :data:`BSR_ERRORS`
        code."""
        if not ffi.signature_ok(frame, (_F32, _F32, _S32, _S32, _F32), (2, 3, 1, 1, 2), 4):
            return 1
        bx, bv, br, bp, bo = _buffers(frame)
        (m, k), (nnz, bk, bn), n = (dim(bx, 0), dim(bx, 1)), ffi.dims3(bv), dim(bo, 1)
        if bk <= 0 or bn <= 0 or bn % 16 or k % bk or n % bn or dim(bo, 0) != m:
            return 2
        if dim(br, 0) != nnz or dim(bp, 0) != n // bn + 1:
            return 2
        ptr = _i32(bp, n // bn + 1)
        if ptr[0] != 0 or ptr[n // bn] != nnz:
            return 3
        for j in range(n // bn):
            if ptr[j + 1] < ptr[j]:
                return 3
        return 0 if _in_range(_i32(br, nnz), k // bk) else 4

    @numba.njit
    def _bsr_run(frame):
        bx, bv, br, bp, bo = _buffers(frame)
        (m, k), (nnz, bk, bn), n = (dim(bx, 0), dim(bx, 1)), ffi.dims3(bv), dim(bo, 1)
        x, vals, out = _f32(bx, (m, k)), _f32(bv, (nnz, bk, bn)), _f32(bo, (m, n))
        _bsr_host(x, vals, _i32(br, nnz), _i32(bp, n // bn + 1), out, _cw(bn))

    @numba.njit
    def _sddmm_check(frame):
        """0 if the SDDMM kernel can run on the frame's buffers, else a :data:`SDDMM_ERRORS`
        code."""
        if not ffi.signature_ok(frame, (_F32, _F32, _S32, _S32, _F32), (2, 2, 1, 1, 3), 4):
            return 1
        bx, bd, br, bc, bo = _buffers(frame)
        (m, k), n, (nnz, bk, bn) = (dim(bx, 0), dim(bx, 1)), dim(bd, 1), ffi.dims3(bo)
        if bk <= 0 or bn <= 0 or bk % 16 or bn % 16 or k % bk or n % bn or dim(bd, 0) != m:
            return 2
        if dim(br, 0) != nnz or dim(bc, 0) != nnz:
            return 2
        ok = _in_range(_i32(br, nnz), k // bk) and _in_range(_i32(bc, nnz), n // bn)
        return 0 if ok else 3

    @numba.njit
    def _sddmm_run(frame):
        bx, bd, br, bc, bo = _buffers(frame)
        (m, k), n, (nnz, bk, bn) = (dim(bx, 0), dim(bx, 1)), dim(bd, 1), ffi.dims3(bo)
        x, dy, out = _f32(bx, (m, k)), _f32(bd, (m, n)), _f32(bo, (nnz, bk, bn))
        _sddmm_host(x, dy, _i32(br, nnz), _i32(bc, nnz), out, _cw(bn))


def _launch(kernel, *args) -> None:
    """Run a parallel kernel from Python, holding the lock the FFI handlers take."""
    ffi.acquire_lock(ffi.LOCK, 1)
    try:
        kernel(*args)
    finally:
        ffi.release_lock(ffi.LOCK)


@functools.cache
def _register() -> str | None:
    """Give the drivers a disk cache where that is safe, compile them and start numba's
    thread pool from Python (a launch from an XLA thread cannot start it), then register both
    handlers; returns why that failed (after one warning), e.g. an XLA that does not support
    :data:`abi.WRITTEN_FOR`."""
    here = Path(__file__).parent
    # The handlers' checks and runs inline ffi.py's frame readers at abi.py's offsets: both are
    # in the cache key, and caching them too saves ~2 s of the ~3 s handler compile per process
    # (the cfunc itself bakes in this process's addresses and is compiled every time).
    sources = ("native.py", "microkernel.py", "ffi.py", "abi.py")
    path = cache.kernel_cache_dir(*(here / name for name in sources))
    if path is not None:
        cache.enable((_bsr_host, _sddmm_host, _bsr_check, _bsr_run, _sddmm_check, _sddmm_run),
                     path)
    one, zero, ptr = np.ones((1, 16, 16), np.float32), np.zeros(1, np.int32), np.arange(2)
    try:
        _launch(_bsr_host, one[0], one, zero, ptr.astype(np.int32), one[0].copy(), 16)
        _launch(_sddmm_host, one[0], one[0], zero, zero, one.copy(), 16)
        ffi.register(_BSR_TARGET, _bsr_check, _bsr_run, BSR_ERRORS)
        ffi.register(_SDDMM_TARGET, _sddmm_check, _sddmm_run, SDDMM_ERRORS)
    except Exception as err:  # any failure means: use the XLA-ops path
        reason = f"registering the FFI handlers failed: {err}"
        msg = f"native CPU kernels disabled, using the XLA-ops path: {reason}"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return reason
    return None


def _call(target: str, out_shape, *operands) -> jax.Array:
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"the native CPU kernels cannot run here: {reason}")
    out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*operands)


def _table(a) -> jax.Array:
    return jnp.asarray(np.asarray(a, np.int32))


def bsr_matmul_native(x: jax.Array, values: jax.Array, layout) -> jax.Array:
    """``x (M, K) @ W (K, N)`` through the native kernel as an XLA custom call (f32 inside,
    result in ``x.dtype``). Block columns must be a multiple of 16."""
    m, (k, n) = x.shape[0], layout.shape
    _check_block(layout.block)
    if x.ndim != 2 or x.shape[1] != k or values.shape != (layout.nnz, *layout.block):
        raise ValueError(
            f"x must be (M, {k}) and values ({layout.nnz}, {layout.block[0]}, "
            f"{layout.block[1]}), got {x.shape} and {values.shape}"
        )
    if m == 0 or layout.nnz == 0:
        return jnp.zeros((m, n), x.dtype)
    f32 = (x.astype(jnp.float32), values.astype(jnp.float32))
    y = _call(_BSR_TARGET, (m, n), *f32, _table(layout.rows), _table(layout.col_ptr))
    return y.astype(x.dtype)


def sddmm_native(x: jax.Array, dy: jax.Array, layout) -> jax.Array:
    """Blocks of ``x.T @ dy`` at the stored positions, ``(nnz, bk, bn)`` in ``x.dtype``,
    through the native kernel as an XLA custom call. Block sides must be multiples of 16."""
    (k, n), out = layout.shape, (layout.nnz, *layout.block)
    _check_block(layout.block, sddmm=True)
    if x.ndim != 2 or x.shape[1] != k or dy.shape != (x.shape[0], n):
        raise ValueError(f"x must be (M, {k}) and dy (M, {n}), got {x.shape} and {dy.shape}")
    if layout.nnz == 0 or x.shape[0] == 0:
        return jnp.zeros(out, x.dtype)
    f32 = (x.astype(jnp.float32), dy.astype(jnp.float32))
    return _call(_SDDMM_TARGET, out, *f32, _table(layout.rows), _table(layout.cols)).astype(x.dtype)
