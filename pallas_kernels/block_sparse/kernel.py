"""Pallas kernels for block-sparse matmul ``x @ W`` and its sampled gradient (SDDMM).

Zero blocks are skipped through index tables computed on the host (see ``format.py`` and
``worklist.py``), as in Gray, Radford & Kingma, "GPU Kernels for Block-Sparse Weights"
(2017), JAX's splash attention and megablox. Two flavours share the tables:

* ``*_prefetch``: TPU (Mosaic) style. The forward runs over a flat work list
  (``worklist.work_items``: one step per stored block plus one per empty block-column,
  scalar-prefetched through ``PrefetchScalarGridSpec``) for each row tile of 512-2048 rows,
  so only stored blocks are DMA'd and no step is padding. The SDDMM runs one program per
  stored block, accumulating over token tiles.
* ``*_gpu``: GPU (Triton) style. The forward's programs own ``bm x (cols*bn)`` output tiles
  (several block-columns) in grouped (L2-friendly) order and loop over each column's stored
  blocks with dynamic slices; the SDDMM splits the tokens over a second grid axis and writes
  float32 partial sums, reduced by the caller (megablox ``tgmm`` style).

Kernel bodies take only refs; wrappers own the grid, BlockSpecs and tile sizes
(``tiles.py`` chooses them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse.format import BSRLayout
from pallas_kernels.block_sparse.tiles import BSRTiles
from pallas_kernels.block_sparse.worklist import FIRST, LAST, VALID, work_items


def _gpu_params(tiles: BSRTiles, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


# ---------------------------------------------------------------- forward, TPU style
def _fwd_prefetch_kernel(blk_ref, xrow_ref, col_ref, flag_ref, x_ref, v_ref, o_ref, acc_ref):
    flag = flag_ref[pl.program_id(1)]

    @pl.when((flag & FIRST) != 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((flag & VALID) != 0)
    def _accumulate():
        acc_ref[...] += jnp.dot(x_ref[...], v_ref[...], preferred_element_type=jnp.float32)

    @pl.when((flag & LAST) != 0)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "tiles", "interpret"))
def bsr_matmul_prefetch(x, values, *, layout: BSRLayout, tiles: BSRTiles, interpret: bool):
    """``x (M, K) @ W``; ``M`` must be a multiple of ``tiles.bm``; ``layout.nnz > 0``.

    Grid ``(M / bm, steps)``: row tiles ("parallel", split across TensorCores) by the flat
    work list ("arbitrary": consecutive steps of a block-column share the output tile)."""
    from jax.experimental.pallas import tpu as pltpu

    m = x.shape[0]
    bk, bn = layout.block
    bm = tiles.bm
    items = work_items(layout)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(m // bm, items.steps),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, s, blk, xrow, col, flag: (i, xrow[s])),
            pl.BlockSpec((None, bk, bn), lambda i, s, blk, xrow, col, flag: (blk[s], 0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, s, blk, xrow, col, flag: (i, col[s])),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    params = None
    if not interpret:
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    return pl.pallas_call(
        _fwd_prefetch_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((m, layout.shape[1]), x.dtype),
        compiler_params=params,
        interpret=interpret,
        name="bsr_matmul",
    )(*(jnp.asarray(a) for a in items), x, values)


# ---------------------------------------------------------------- forward, GPU style
def swizzle(pid, n_rows: int, n_cols: int, group: int):
    """Grouped program order (Triton's matmul tutorial): ``group`` row tiles run for each
    column tile before the next column tile, so their ``x`` rows and the column tile's weight
    blocks are reused from L2. Returns ``(row tile, column tile)`` of program ``pid``."""
    in_group = group * n_cols
    first = (pid // in_group) * group
    size = jnp.minimum(n_rows - first, group)
    i = first + (pid % in_group) % size
    j = (pid % in_group) // size
    return i, j


def _fwd_gpu_kernel(ptr_ref, rows_ref, x_ref, v_ref, o_ref, *, cols: int, n_rows: int,
                    n_cols: int, group: int):
    _, jt = swizzle(pl.program_id(0), n_rows, n_cols, group)
    bk, bn = v_ref.shape[1], v_ref.shape[2]

    def body(z, acc):
        start = pl.multiple_of(rows_ref[z] * bk, bk)
        xs = x_ref[:, pl.ds(start, bk)]
        return acc + jnp.dot(xs, v_ref[z], preferred_element_type=jnp.float32)

    for c in range(cols):  # the block-columns of this output tile
        j = jt * cols + c
        acc = lax.fori_loop(ptr_ref[j], ptr_ref[j + 1], body,
                            jnp.zeros((o_ref.shape[0], bn), jnp.float32))
        o_ref[:, c * bn:(c + 1) * bn] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "tiles", "interpret"))
def bsr_matmul_gpu(x, values, *, layout: BSRLayout, tiles: BSRTiles, interpret: bool):
    """GPU (Triton) flavour of :func:`bsr_matmul_prefetch`: ``M % tiles.bm == 0``,
    ``layout.grid[1] % tiles.cols == 0``, ``layout.nnz > 0``. One program per
    ``bm x (cols * bn)`` output tile, in :func:`swizzle` order."""
    m, k = x.shape
    bk, bn = layout.block
    bm, nnz, cols = tiles.bm, layout.nnz, tiles.cols
    nn = layout.grid[1]
    n_rows, n_cols = m // bm, nn // cols
    group = max(1, min(tiles.group, n_rows))
    tile = functools.partial(swizzle, n_rows=n_rows, n_cols=n_cols, group=group)
    return pl.pallas_call(
        functools.partial(_fwd_gpu_kernel, cols=cols, n_rows=n_rows, n_cols=n_cols, group=group),
        grid=(n_rows * n_cols,),
        in_specs=[
            pl.BlockSpec((nn + 1,), lambda p: (0,)),
            pl.BlockSpec((nnz,), lambda p: (0,)),
            pl.BlockSpec((bm, k), lambda p: (tile(p)[0], 0)),
            pl.BlockSpec((nnz, bk, bn), lambda p: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, cols * bn), lambda p: tile(p)),
        out_shape=jax.ShapeDtypeStruct((m, layout.shape[1]), x.dtype),
        compiler_params=_gpu_params(tiles, interpret),
        interpret=interpret,
        name="bsr_matmul_gpu",
    )(jnp.asarray(layout.col_ptr), jnp.asarray(layout.rows), x, values)


# ---------------------------------------------------------------- SDDMM (dW), TPU style
def _sddmm_prefetch_kernel(rows_ref, cols_ref, x_ref, dy_ref, o_ref, acc_ref):
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += lax.dot_general(
        x_ref[...], dy_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )

    @pl.when(i == pl.num_programs(1) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "tiles", "interpret"))
def sddmm_prefetch(x, dy, *, layout: BSRLayout, tiles: BSRTiles, interpret: bool):
    """Stored blocks of ``x.T @ dy`` (``(nnz, bk, bn)``); ``M`` a multiple of ``tiles.bm``."""
    from jax.experimental.pallas import tpu as pltpu

    m = x.shape[0]
    bk, bn = layout.block
    bm = tiles.bm
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(layout.nnz, m // bm),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda z, i, rows, cols: (i, rows[z])),
            pl.BlockSpec((bm, bn), lambda z, i, rows, cols: (i, cols[z])),
        ],
        out_specs=pl.BlockSpec((None, bk, bn), lambda z, i, rows, cols: (z, 0, 0)),
        scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
    )
    params = None
    if not interpret:
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    return pl.pallas_call(
        _sddmm_prefetch_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((layout.nnz, bk, bn), x.dtype),
        compiler_params=params,
        interpret=interpret,
        name="bsr_sddmm",
    )(jnp.asarray(layout.rows), jnp.asarray(layout.cols), x, dy)


# ---------------------------------------------------------------- SDDMM (dW), GPU style
def _sddmm_gpu_kernel(rows_ref, cols_ref, x_ref, dy_ref, o_ref, *, bm: int, steps: int):
    z, s = pl.program_id(0), pl.program_id(1)
    bk, bn = o_ref.shape
    r0 = pl.multiple_of(rows_ref[z] * bk, bk)
    c0 = pl.multiple_of(cols_ref[z] * bn, bn)

    def body(t, acc):
        m0 = pl.multiple_of((s * steps + t) * bm, bm)
        xs = x_ref[pl.ds(m0, bm), pl.ds(r0, bk)]
        ds = dy_ref[pl.ds(m0, bm), pl.ds(c0, bn)]
        return acc + jnp.dot(xs.T, ds, preferred_element_type=jnp.float32)

    o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), jnp.float32))


@functools.partial(jax.jit, static_argnames=("layout", "tiles", "splits", "interpret"))
def sddmm_gpu(x, dy, *, layout: BSRLayout, tiles: BSRTiles, splits: int = 1, interpret: bool):
    """GPU (Triton) SDDMM with the tokens split ``splits`` ways over a second grid axis:
    program ``(z, s)`` sums block ``z`` over token rows ``[s M/splits, (s+1) M/splits)``
    into a float32 partial, and the partials are reduced here (as megablox's ``tgmm``
    splits its weight gradient), so ``nnz * splits`` programs fill the device even when few
    blocks are stored. ``M`` must be a multiple of ``tiles.bm * splits``."""
    m, k = x.shape
    n = dy.shape[1]
    bk, bn = layout.block
    nnz, bm = layout.nnz, tiles.bm
    steps = m // (bm * splits)
    partial = pl.pallas_call(
        functools.partial(_sddmm_gpu_kernel, bm=bm, steps=steps),
        grid=(nnz, splits),
        in_specs=[
            pl.BlockSpec((nnz,), lambda z, s: (0,)),
            pl.BlockSpec((nnz,), lambda z, s: (0,)),
            pl.BlockSpec((m, k), lambda z, s: (0, 0)),
            pl.BlockSpec((m, n), lambda z, s: (0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bk, bn), lambda z, s: (s, z, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((splits, nnz, bk, bn), jnp.float32),
        compiler_params=_gpu_params(tiles, interpret),
        interpret=interpret,
        name="bsr_sddmm_gpu",
    )(jnp.asarray(layout.rows), jnp.asarray(layout.cols), x, dy)
    return partial.sum(axis=0).astype(x.dtype)


__all__ = [
    "BSRTiles",
    "swizzle",
    "bsr_matmul_prefetch",
    "bsr_matmul_gpu",
    "sddmm_prefetch",
    "sddmm_gpu",
]
