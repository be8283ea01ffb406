"""Mask methods for :func:`sparsejax.sparsify` (one file per method family)."""

from sparsejax.methods.base import MaskMethod, dense_masks
from sparsejax.methods.gradual import gradual
from sparsejax.methods.nm import nm
from sparsejax.methods.static import static

__all__ = ["MaskMethod", "dense_masks", "gradual", "nm", "static"]
