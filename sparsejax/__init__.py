"""sparsejax: sparse pre-training and sparse scaling laws in JAX/Flax.

Mask transforms compose with Optax::

    import optax, sparsejax
    from sparsejax import methods, schedules

    tx = sparsejax.sparsify(
        optax.adamw(1e-3),
        methods.gradual(schedules.polynomial(0.9, 100, 1000, update_every=10)),
    )
"""

from sparsejax import allocation, axes, masks, methods, prunable, schedules, scores
from sparsejax.export import load_export
from sparsejax.loading import Loaded, load
from sparsejax.prunable import describe
from sparsejax.state import (
    SparsityStats,
    apply_masks,
    check,
    find_state,
    forward_params,
    masks_of,
    prune,
    sparsity_stats,
)
from sparsejax.transforms import SparsifyState, sparsify

__version__ = "0.1.0"

__all__ = [
    "Loaded",
    "SparsifyState",
    "SparsityStats",
    "allocation",
    "apply_masks",
    "axes",
    "check",
    "describe",
    "find_state",
    "forward_params",
    "load",
    "load_export",
    "masks",
    "masks_of",
    "methods",
    "prunable",
    "prune",
    "schedules",
    "scores",
    "sparsify",
    "sparsity_stats",
]
