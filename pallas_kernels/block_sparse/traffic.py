"""Expected time of the BSR kernels as tiled (the "expected" column of the roofline table).

The ideal (:func:`pallas_kernels.roofline.matmul_cost`) reads every operand once. The kernels
do not, and this model counts what they do read, for a uniformly random block mask at
density ``d`` (``nk x nn`` block grid, ``nnz = d nk nn`` stored blocks), with the tiles
:mod:`pallas_kernels.block_sparse.tiles` chooses. Assumptions (to be replaced by the
measured column): MMA at :data:`~pallas_kernels.roofline.SPARSE_EFFICIENCY` of the peak;
GPU L2 holds the ``x`` row panels of one swizzle group, so ``x`` is read about once and a
weight block once per group; TPU re-DMAs every step's tiles (no cache) and pays
:data:`TPU_STEP_S` per grid step (the Pallas TPU docs' order of magnitude).

* GPU forward/dX: ``x`` once, weights ``ceil(M / (bm group))`` times, output once; FLOPs
  slowed by wave quantisation of the ``(M / bm) (nn / cols)`` programs over the SMs.
* GPU dW: :func:`pallas_kernels.block_sparse.tiles.dw_plan`'s choice and estimate.
* TPU forward/dX: per row tile, one ``(bm, bk)`` tile of ``x`` and one weight block per stored
  block (``x`` read ``d nn`` times), plus one step per empty block-column.
* TPU dW: per stored block, ``x`` and ``dy`` column slabs over all tokens.
"""

from __future__ import annotations

import math

from pallas_kernels.block_sparse.tiles import dw_plan, gpu_tiles, tpu_tiles
from pallas_kernels.roofline import SPARSE_EFFICIENCY, Device, matmul_cost

TPU_STEP_S = 0.35e-6  # per grid step overhead of a Pallas TPU kernel


def _mma_s(flops: float, device: Device, fill: float = 1.0) -> float:
    return flops / (device.peak_flops * SPARSE_EFFICIENCY * fill)


def expected_seconds(m: int, k: int, n: int, density: float, block: int, itemsize: int,
                     pass_: str, device: Device) -> float:
    """Expected time of one pass (``forward``, ``dX``, ``dW``) of ``x (M, K) @ W (K, N)``
    with square ``block`` blocks at block density ``density`` on ``device``."""
    if pass_ == "dX":  # dY (M, N) @ Wᵀ (N, K): the forward on the transposed shape
        k, n, pass_ = n, k, "forward"
    nk, nn = k // block, n // block
    nnz = max(0, round(density * nk * nn))
    flops = matmul_cost(m, k, n, density, itemsize, "forward").flops
    if nnz == 0:
        return m * n * itemsize / device.bandwidth
    if device.kind == "gpu" and pass_ == "forward":
        t = gpu_tiles(m, n, (block, block), itemsize, device.cores)
        programs = math.ceil(m / t.bm) * (nn // t.cols)
        waves = math.ceil(programs / device.cores)
        elems = m * k + density * k * n * math.ceil(m / (t.bm * t.group)) + m * n
        return max(_mma_s(flops, device, programs / (waves * device.cores)),
                   elems * itemsize / device.bandwidth)
    if device.kind == "gpu":
        plan = dw_plan(m, k, n, (block, block), nnz, itemsize, device)
        return plan.split_s if plan.path == "split" else plan.dense_s
    bm = tpu_tiles(m, (block, block), itemsize).bm
    row_tiles = math.ceil(m / bm)
    if pass_ == "forward":
        empty = nn * (1.0 - density) ** nk  # expected empty block-columns
        steps = row_tiles * (nnz + empty)
        elems = row_tiles * nnz * (bm * block + block * block) + m * n
    else:
        steps = nnz * row_tiles
        elems = nnz * m * 2 * block + nnz * block * block
    return max(_mma_s(flops, device), elems * itemsize / device.bandwidth) + steps * TPU_STEP_S


__all__ = ["TPU_STEP_S", "expected_seconds"]
