"""Mask methods for :func:`sparsejax.sparsify` (one file per method family)."""

from sparsejax.methods.acdc import acdc
from sparsejax.methods.base import (
    Cadence,
    MaskMethod,
    always,
    dense_masks,
    following,
    never,
    periodic,
)
from sparsejax.methods.block import block
from sparsejax.methods.channels import channel_plan, channels
from sparsejax.methods.dst import rigl, set_
from sparsejax.methods.fixed import fixed
from sparsejax.methods.gradual import gradual
from sparsejax.methods.nm import nm
from sparsejax.methods.spdf import spdf
from sparsejax.methods.static import static
from sparsejax.methods.ste import mdgf, sdgf, sr_ste, ste
from sparsejax.methods.ste_unstructured import ste_unstructured

__all__ = [
    "Cadence",
    "MaskMethod",
    "acdc",
    "always",
    "block",
    "channel_plan",
    "channels",
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
    "ste_unstructured",
    "mdgf",
]
