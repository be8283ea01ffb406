"""Models: a decoder-only transformer in Flax NNX whose linear layers come from a factory."""

from sparsejax.models.gpt import GPT, VARIANTS, GPTConfig, cross_entropy, loss_fn
from sparsejax.models.layers import LinearFactory, dense_linear

__all__ = [
    "GPT",
    "GPTConfig",
    "LinearFactory",
    "VARIANTS",
    "cross_entropy",
    "dense_linear",
    "loss_fn",
]
