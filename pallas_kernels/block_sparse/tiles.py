"""Tile configurations for the BSR kernels, chosen by shape in one place.

The op wrappers call :func:`choose_tiles` (forward, dX) and :func:`dw_plan` (dW); call sites
never pick tiles by hand (an explicit :class:`BSRTiles` still overrides, for tests and
tuning). Why these tiles (the roofline in :mod:`pallas_kernels.roofline`):

* **GPU forward / dX** (Triton): a program owns a ``bm x (cols * bn)`` output tile spanning
  ``cols`` block-columns, 128-256 wide, as a dense Triton matmul's 128x128-128x256 tiles: a
  32- or 64-wide block tile alone leaves the MMA pipeline and the program launch under-used.
  Programs run in grouped ("swizzled") order, ``group`` row tiles per column tile, as in
  Triton's matmul tutorial and ``jax.experimental.pallas.ops.gpu``: the weight blocks of one
  column tile and the ``x`` rows of ``group`` row tiles stay in L2 while consumed.
  ``num_warps``/``num_stages`` follow the tile area (8 warps for 128x256 16-bit tiles, 4
  below; 3-4 stages of software pipelining, fewer for 4-byte inputs whose tiles are larger).
  When the grid would not fill the SMs, the tile narrows first, then shortens.
* **TPU** (Mosaic): row tiles of 512-2048 (the MXU's best shapes are long in M; the weight
  block is re-read once per row tile, so a 128-row tile re-reads it 4-16x more often) over a
  flat list of (row tile, stored block) work items (see ``kernel.tpu_work_items``).
* **dW**: :func:`dw_plan` (below).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from pallas_kernels.roofline import SPARSE_EFFICIENCY, Device, matmul_cost


@dataclasses.dataclass(frozen=True)
class BSRTiles:
    """Tile sizes. ``bm``: rows of ``x`` per program (GPU) or per row tile (TPU); ``cols``:
    block-columns per output tile (GPU); ``group``: row tiles per swizzle group (GPU);
    ``splits``: token splits of the dW kernel (GPU; 0: from :func:`dw_plan`); ``dw``: the dW
    path (``"auto"``: :func:`dw_plan`; ``"split"``/``"dense"`` force one); Triton
    ``num_warps``/``num_stages``."""

    bm: int = 128
    num_warps: int = 4
    num_stages: int = 3
    cols: int = 1
    group: int = 8
    splits: int = 0
    dw: str = "auto"  # "auto" (dw_plan), "split" or "dense"


# (block-column width bn, input itemsize) -> (bm, output tile width, num_warps, num_stages).
_GPU_TABLE: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (16, 2): (64, 128, 4, 4),
    (32, 2): (64, 128, 4, 4),
    (64, 2): (128, 256, 8, 3),
    (128, 2): (128, 256, 8, 3),
    (256, 2): (64, 256, 8, 3),
    (16, 4): (64, 128, 4, 3),
    (32, 4): (64, 128, 4, 3),
    (64, 4): (64, 128, 4, 3),
    (128, 4): (64, 128, 4, 3),
    (256, 4): (32, 256, 8, 2),
}
TPU_ROWS = (2048, 1024, 512)  # row tiles, largest first
TPU_MIN_ROWS = 16  # sublane multiple (bf16 packs 16 rows) for small M


def _pow2_at_least(m: int, floor: int) -> int:
    return max(floor, 1 << max(0, (m - 1).bit_length()))


def gpu_tiles(m: int, n: int, block: tuple[int, int], itemsize: int, cores: int = 132) -> BSRTiles:
    """GPU (Triton) tiles for an ``(M, K) @ (K, N)`` product with ``block``-sized blocks."""
    bn = block[1]
    key = (bn, 2 if itemsize <= 2 else 4)
    bm, width, warps, stages = _GPU_TABLE.get(key, (64, max(128, bn), 4, 3))
    nn = n // bn
    cols = max(1, min(width // bn, nn))
    while nn % cols:
        cols -= 1
    bm = min(bm, _pow2_at_least(m, 16))
    # Fill the device: narrow the tile, then shorten it, while fewer programs than SMs.
    while math.ceil(m / bm) * (nn // cols) < cores and (cols > 1 or bm > 32):
        if cols > 1:
            cols = max(c for c in range(1, cols) if nn % c == 0)
        else:
            bm //= 2
    if bm * cols * bn <= 64 * 128:
        warps = 4
    return BSRTiles(bm=bm, num_warps=warps, num_stages=stages, cols=cols)


TPU_VMEM_BUDGET = 12 * 2**20  # bytes for one step's buffers (v5e's scoped default is 16 MiB)


def tpu_tiles(m: int, block: tuple[int, int] = (128, 128), itemsize: int = 2) -> BSRTiles:
    """TPU row tile: the largest of 2048/1024/512 that ``M`` reaches with at most 1/8 of the
    rows padding and whose buffers fit :data:`TPU_VMEM_BUDGET` (double-buffered ``x`` and
    output tiles, a float32 accumulator); 512 for any other ``M >= 512``; below that one
    tile of ``M`` rounded up to a multiple of 16 (bf16 sublane packing)."""
    bk, bn = block

    def fits(rows: int) -> bool:
        return 2 * rows * (bk + bn) * itemsize + 4 * rows * bn <= TPU_VMEM_BUDGET

    for rows in TPU_ROWS:
        if m >= rows and (-m) % rows <= m // 8 and fits(rows):
            return BSRTiles(bm=rows)
    if m >= TPU_ROWS[-1]:
        return BSRTiles(bm=TPU_ROWS[-1])
    return BSRTiles(bm=max(TPU_MIN_ROWS, -(-m // TPU_MIN_ROWS) * TPU_MIN_ROWS))


def choose_tiles(impl: str, m: int, n: int, block: tuple[int, int], itemsize: int) -> BSRTiles:
    """Tiles for ``impl`` (``gpu``/``interpret_gpu`` or ``tpu``/``interpret_tpu``)."""
    if impl.endswith("gpu"):
        return gpu_tiles(m, n, block, itemsize)
    return tpu_tiles(m, block, itemsize)


# ------------------------------------------------------------------------- dW cost model
MIN_SPLIT_ROWS = 512  # a token split below this costs more in partial sums than it fills


class DWPlan(NamedTuple):
    """How to compute dW at the stored blocks: ``"split"`` (the SDDMM kernel, tokens split
    ``splits`` ways, partial sums reduced) or ``"dense"`` (one dense ``xᵀ dy`` GEMM, then the
    stored blocks gathered). Times are the model's estimates (seconds)."""

    path: str
    splits: int
    split_s: float
    dense_s: float


def dw_plan(m: int, k: int, n: int, block: tuple[int, int], nnz: int, itemsize: int,
            device: Device, efficiency: float = SPARSE_EFFICIENCY) -> DWPlan:
    """Choose the dW path by a roofline cost model.

    Split kernel: ``splits = clamp(next_pow2(ceil(2 * cores / nnz)), 1, M // 512)`` so that
    ``nnz * splits`` programs fill the device twice where tokens allow. Its time is
    ``max(F / (peak * eff * fill), B / bw)`` with ``F = 2 M bk bn nnz``, ``fill =
    min(1, nnz * splits / cores)``, ``B``: the ``x`` slab of every stored block
    (``nnz M bk``; consecutive blocks share a block-column, so ``dy`` is read about once,
    ``M N``), the stored blocks, and the f32 partial sums written and read back
    (``2 * 4 * splits * nnz * bk * bn`` bytes).
    Dense: the dense dW roofline time plus reading the full f32 ``xᵀ dy`` once to gather
    (``4 K N`` bytes). The cheaper one wins (ties: split).
    """
    bk, bn = block
    if nnz <= 0:
        return DWPlan("split", 1, 0.0, 0.0)
    want = max(1, math.ceil(2 * device.cores / nnz))
    splits = min(1 << (want - 1).bit_length(), max(1, m // MIN_SPLIT_ROWS))
    splits = 1 << (splits.bit_length() - 1)  # a power of 2 at most the cap
    fill = min(1.0, nnz * splits / device.cores)
    flops = 2.0 * m * bk * bn * nnz
    read_bytes = (nnz * m * bk + m * n + nnz * bk * bn) * itemsize
    partial_bytes = 2 * 4 * splits * nnz * bk * bn
    split_s = max(flops / (device.peak_flops * efficiency * fill),
                  (read_bytes + partial_bytes) / device.bandwidth)
    dense = matmul_cost(m, k, n, 1.0, itemsize, "dW")
    dense_s = max(dense.flops / device.peak_flops, (dense.bytes + 4 * k * n) / device.bandwidth)
    path = "split" if split_s <= dense_s else "dense"
    return DWPlan(path, splits, split_s, dense_s)


__all__ = ["BSRTiles", "DWPlan", "choose_tiles", "dw_plan", "gpu_tiles", "tpu_tiles"]
