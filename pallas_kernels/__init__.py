"""Sparse matmul kernels (block-sparse BSR and N:M) with Pallas, CPU and reference paths.

The Flax NNX layers are imported lazily, so the kernels work where flax is not installed.
"""

from typing import Any

from pallas_kernels.block_sparse.format import BSRLayout, BSRMatrix
from pallas_kernels.block_sparse.ops import bsr_matmul
from pallas_kernels.nm.format import NMMatrix
from pallas_kernels.nm.ops import nm_matmul

_LAYERS = (
    "BlockLayout",
    "BSRLinear",
    "NMCodes",
    "NMLinear",
    "bsr_linear_factory",
    "nm_linear_factory",
)

__all__ = ["BSRLayout", "BSRMatrix", "bsr_matmul", "NMMatrix", "nm_matmul", *_LAYERS]


def __getattr__(name: str) -> Any:
    if name in _LAYERS:
        from pallas_kernels import layers

        return getattr(layers, name)
    raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
