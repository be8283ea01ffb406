"""sparsejax: sparse pre-training and sparse scaling laws in JAX/Flax.

The top level is the Optax library (masks, scores, allocations, schedules, methods,
``sparsify``); the run framework lives in :mod:`sparsejax.run` (config -> build -> train ->
run dir), :mod:`sparsejax.downstream` (load, fine-tune, export) and :mod:`sparsejax.sweep`.

Mask transforms compose with Optax::

    import optax, sparsejax
    from sparsejax import methods, schedules

    tx = sparsejax.sparsify(
        optax.adamw(1e-3),
        methods.gradual(schedules.polynomial(0.9, 100, 1000, update_every=10)),
    )
"""

from typing import TYPE_CHECKING, Any

from sparsejax import allocation, axes, masks, methods, prunable, schedules, scores
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

if TYPE_CHECKING:
    from sparsejax.downstream.export import load_export
    from sparsejax.downstream.generate import generate
    from sparsejax.downstream.loading import Loaded, load

__version__ = "0.1.0"

# The run framework's entry points a user reaches from the package (``sparsejax.load(run_dir)``,
# ``sparsejax.generate(loaded, prompt)``),
# imported on first use: ``import sparsejax`` stays the Optax library (no orbax, no data).
_LAZY = {
    "load": "sparsejax.downstream.loading",
    "Loaded": "sparsejax.downstream.loading",
    "load_export": "sparsejax.downstream.export",
    "generate": "sparsejax.downstream.generate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsejax' has no attribute {name!r}")

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
    "generate",
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
