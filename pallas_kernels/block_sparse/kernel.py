"""Pallas kernels for block-sparse matmul ``x @ W`` and its sampled gradient (SDDMM).

Zero blocks are skipped through index tables computed on the host (see ``format.py``), as in
Gray, Radford & Kingma, "GPU Kernels for Block-Sparse Weights" (2017) and JAX's splash
attention. Two flavours share the same tables:

* ``*_prefetch``: TPU style. The tables are scalar-prefetched (``PrefetchScalarGridSpec``)
  and drive the BlockSpec index maps, so only stored blocks are DMA'd; the grid's last axis
  runs over the stored blocks of one output block-column (padded to the longest column;
  padded steps re-use the previous block index, so nothing is re-fetched, and skip compute).
* ``*_gpu``: GPU (Triton) style. Each program owns one output tile and loops over the
  column's stored blocks, reading the tables from refs and loading blocks with dynamic
  slices.

Kernel bodies take only refs; wrappers own the grid, BlockSpecs and tile sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse.format import BSRLayout


@dataclasses.dataclass(frozen=True)
class BSRTiles:
    """Tile sizes: ``bm`` rows of ``x`` per program; Triton ``num_warps``/``num_stages``."""

    bm: int = 128
    num_warps: int = 4
    num_stages: int = 3


def _tpu_params(interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _gpu_params(tiles: BSRTiles, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


# ---------------------------------------------------------------- forward, TPU style
def _fwd_prefetch_kernel(ptr_ref, rows_ref, x_ref, v_ref, o_ref, acc_ref):
    j, p = pl.program_id(1), pl.program_id(2)

    @pl.when(p == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(p < ptr_ref[j + 1] - ptr_ref[j])
    def _accumulate():
        acc_ref[...] += jnp.dot(x_ref[...], v_ref[...], preferred_element_type=jnp.float32)

    @pl.when(p == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _block_index(j, p, ptr, nnz):
    count = ptr[j + 1] - ptr[j]
    return jnp.minimum(ptr[j] + jnp.minimum(p, jnp.maximum(count - 1, 0)), nnz - 1)


@functools.partial(jax.jit, static_argnames=("layout", "tiles", "interpret"))
def bsr_matmul_prefetch(x, values, *, layout: BSRLayout, tiles: BSRTiles, interpret: bool):
    """``x (M, K) @ W``; ``M`` must be a multiple of ``tiles.bm``; ``layout.nnz > 0``."""
    from jax.experimental.pallas import tpu as pltpu

    m = x.shape[0]
    bk, bn = layout.block
    bm, nnz = tiles.bm, layout.nnz
    idx = functools.partial(_block_index, nnz=nnz)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(m // bm, layout.grid[1], layout.max_per_col),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, p, ptr, rows: (i, rows[idx(j, p, ptr)])),
            pl.BlockSpec((None, bk, bn), lambda i, j, p, ptr, rows: (idx(j, p, ptr), 0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, p, ptr, rows: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    return pl.pallas_call(
        _fwd_prefetch_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((m, layout.shape[1]), x.dtype),
        compiler_params=_tpu_params(interpret),
        interpret=interpret,
        name="bsr_matmul",
    )(jnp.asarray(layout.col_ptr), jnp.asarray(layout.rows), x, values)


# ---------------------------------------------------------------- forward, GPU style
def _fwd_gpu_kernel(ptr_ref, rows_ref, x_ref, v_ref, o_ref):
    j = pl.program_id(1)
    bk = v_ref.shape[1]

    def body(z, acc):
        start = pl.multiple_of(rows_ref[z] * bk, bk)
        xs = x_ref[:, pl.ds(start, bk)]
        return acc + jnp.dot(xs, v_ref[z], preferred_element_type=jnp.float32)

    acc = lax.fori_loop(ptr_ref[j], ptr_ref[j + 1], body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "tiles", "interpret"))
def bsr_matmul_gpu(x, values, *, layout: BSRLayout, tiles: BSRTiles, interpret: bool):
    """GPU (Triton) flavour of :func:`bsr_matmul_prefetch`; same contract."""
    m, k = x.shape
    bk, bn = layout.block
    bm, nnz = tiles.bm, layout.nnz
    nn = layout.grid[1]
    return pl.pallas_call(
        _fwd_gpu_kernel,
        grid=(m // bm, nn),
        in_specs=[
            pl.BlockSpec((nn + 1,), lambda i, j: (0,)),
            pl.BlockSpec((nnz,), lambda i, j: (0,)),
            pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((nnz, bk, bn), lambda i, j: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
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
def _sddmm_gpu_kernel(rows_ref, cols_ref, x_ref, dy_ref, o_ref, *, bm: int):
    z = pl.program_id(0)
    bk, bn = o_ref.shape
    r0 = pl.multiple_of(rows_ref[z] * bk, bk)
    c0 = pl.multiple_of(cols_ref[z] * bn, bn)

    def body(i, acc):
        m0 = pl.multiple_of(i * bm, bm)
        xs = x_ref[pl.ds(m0, bm), pl.ds(r0, bk)]
        ds = dy_ref[pl.ds(m0, bm), pl.ds(c0, bn)]
        return acc + jnp.dot(xs.T, ds, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, x_ref.shape[0] // bm, body, jnp.zeros((bk, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("layout", "tiles", "interpret"))
def sddmm_gpu(x, dy, *, layout: BSRLayout, tiles: BSRTiles, interpret: bool):
    """GPU (Triton) flavour of :func:`sddmm_prefetch`; same contract."""
    m, k = x.shape
    n = dy.shape[1]
    bk, bn = layout.block
    nnz = layout.nnz
    return pl.pallas_call(
        functools.partial(_sddmm_gpu_kernel, bm=tiles.bm),
        grid=(nnz,),
        in_specs=[
            pl.BlockSpec((nnz,), lambda z: (0,)),
            pl.BlockSpec((nnz,), lambda z: (0,)),
            pl.BlockSpec((m, k), lambda z: (0, 0)),
            pl.BlockSpec((m, n), lambda z: (0, 0)),
        ],
        out_specs=pl.BlockSpec((None, bk, bn), lambda z: (z, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((nnz, bk, bn), x.dtype),
        compiler_params=_gpu_params(tiles, interpret),
        interpret=interpret,
        name="bsr_sddmm_gpu",
    )(jnp.asarray(layout.rows), jnp.asarray(layout.cols), x, dy)


__all__ = [
    "BSRTiles",
    "bsr_matmul_prefetch",
    "bsr_matmul_gpu",
    "sddmm_prefetch",
    "sddmm_gpu",
]
