"""Mask methods for :func:`sparsejax.sparsify` (one file per method family)."""

from sparsejax.methods.base import (
    Cadence,
    MaskMethod,
    always,
    dense_masks,
    following,
    never,
    periodic,
)
from sparsejax.methods.dst import rigl, set_
from sparsejax.methods.fixed import fixed
from sparsejax.methods.gradual import gradual
from sparsejax.methods.nm import nm
from sparsejax.methods.spdf import spdf
from sparsejax.methods.static import static
from sparsejax.methods.ste import mdgf, sdgf, sr_ste, ste

__all__ = [
    "Cadence",
    "MaskMethod",
    "always",
    "dense_masks",
    "fixed",
    "following",
    "gradual",
    "never",
    "nm",
    "periodic",
    "rigl",
    "set_",
    "spdf",
    "sdgf",
    "sr_ste",
    "static",
    "ste",
    "mdgf",
]
