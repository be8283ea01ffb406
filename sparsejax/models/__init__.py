"""Models: a decoder-only transformer in Flax NNX whose linear layers come from a factory.

The names below are imported on first use, so that ``sparsejax.models.options`` (the
settings' names the config schema lists) loads without Flax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparsejax.models.gpt import GPT, VARIANTS, GPTConfig, cross_entropy, loss_fn
    from sparsejax.models.layers import LinearFactory, dense_linear

_LAZY = {
    "GPT": "sparsejax.models.gpt",
    "GPTConfig": "sparsejax.models.gpt",
    "VARIANTS": "sparsejax.models.gpt",
    "cross_entropy": "sparsejax.models.gpt",
    "loss_fn": "sparsejax.models.gpt",
    "LinearFactory": "sparsejax.models.layers",
    "dense_linear": "sparsejax.models.layers",
}

__all__ = ["GPT", "GPTConfig", "LinearFactory", "VARIANTS", "cross_entropy", "dense_linear",
           "loss_fn"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsejax.models' has no attribute {name!r}")
