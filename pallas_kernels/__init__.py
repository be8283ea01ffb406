"""Sparse matmul kernels (block-sparse BSR and N:M) with Pallas, CPU and reference paths."""

from pallas_kernels.block_sparse.format import BSRLayout, BSRMatrix
from pallas_kernels.block_sparse.ops import bsr_matmul
from pallas_kernels.layers import (
    BlockLayout,
    BSRLinear,
    NMCodes,
    NMLinear,
    bsr_linear_factory,
    nm_linear_factory,
)
from pallas_kernels.nm.format import NMMatrix
from pallas_kernels.nm.ops import nm_matmul

__all__ = [
    "BSRLayout",
    "BSRMatrix",
    "bsr_matmul",
    "NMMatrix",
    "nm_matmul",
    "BSRLinear",
    "NMLinear",
    "BlockLayout",
    "NMCodes",
    "bsr_linear_factory",
    "nm_linear_factory",
]
