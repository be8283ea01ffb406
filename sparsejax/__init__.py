"""sparsejax: sparse pre-training and sparse scaling laws in JAX/Flax.

Mask transforms compose with Optax::

    import optax, sparsejax
    from sparsejax import methods, schedules

    tx = sparsejax.sparsify(
        optax.adamw(1e-3),
        methods.gradual(schedules.polynomial(0.9, 100, 1000, update_every=10)),
    )
"""

from sparsejax import allocation, masks, methods, prunable, schedules, scores
from sparsejax.transforms import (
    SparsifyState,
    apply_masks,
    find_state,
    forward_params,
    masks_of,
    sparsify,
)

__version__ = "0.1.0"

__all__ = [
    "SparsifyState",
    "allocation",
    "apply_masks",
    "find_state",
    "forward_params",
    "masks",
    "masks_of",
    "methods",
    "prunable",
    "schedules",
    "scores",
    "sparsify",
]
