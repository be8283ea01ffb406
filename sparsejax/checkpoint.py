"""Checkpoints: orbax ``CheckpointManager`` over the whole training state, and loading for
downstream use (fine-tuning, export).

A checkpoint holds one pytree: ``{"step", "params", "opt_state", "rng", "n_avg", "flops"}``,
params as a pure nested dict (``nnx.to_pure_dict``), the optimizer state with its masks. Saves
copy to host first, so donated device buffers are never read after the step that donates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def manager(run_dir: str | Path, *, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager on ``run_dir/checkpoints`` keeping the last ``keep`` checkpoints."""
    if not (isinstance(keep, int) and keep >= 1):
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    directory = Path(run_dir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Save ``state`` at ``step`` (host copy; the write itself may finish asynchronously)."""
    mngr.save(int(step), args=ocp.args.StandardSave(jax.device_get(state)))


def restore(mngr: ocp.CheckpointManager, like: Any, step: int | None = None) -> Any:
    """Restore the checkpoint at ``step`` (default: latest) into the structure of ``like``."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def latest_step(run_dir: str | Path) -> int | None:
    """The latest complete checkpoint step of a run dir, or ``None``."""
    path = Path(run_dir) / CHECKPOINT_DIR
    if not path.is_dir():
        return None
    mngr = manager(run_dir, create=False)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def load_raw(run_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """The checkpoint as saved, without a target structure (NamedTuples come back as dicts).

    Enough to read ``params`` and the masks for export and inspection.
    """
    mngr = manager(run_dir, create=False)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / CHECKPOINT_DIR}")
        return mngr.restore(step, args=ocp.args.StandardRestore())
    finally:
        mngr.close()


def find_masks(opt_state: Any) -> Any | None:
    """The masks inside a raw (dict-shaped) or structured optimizer state, if any."""
    from sparsejax.transforms import SparsifyState

    if isinstance(opt_state, SparsifyState):
        return opt_state.masks
    if isinstance(opt_state, dict):
        if {"count", "masks", "key", "method_state", "inner_state"} <= set(opt_state):
            return opt_state["masks"]
        children = opt_state.values()
    elif isinstance(opt_state, list | tuple):
        children = opt_state
    else:
        return None
    for child in children:
        found = find_masks(child)
        if found is not None:
            return found
    return None


def load_for_finetuning(
    run_dir: str | Path, *, dense: bool = True, step: int | None = None
) -> tuple[dict[str, Any], Any | None]:
    """Params of a (sparse) pre-training run, ready for a new optimizer.

    SPDF (Thangarasa et al. 2023, "SPDF: Sparse Pre-training and Dense Fine-tuning"): with
    ``dense=True`` every weight becomes trainable again (pruned ones resume from exactly 0)
    and the returned masks are ``None``; with ``dense=False`` the masks are returned too, so
    the fine-tuning optimizer can keep them fixed (e.g. ``methods.static`` or
    :func:`sparsejax.apply_masks` after each step).
    Returns ``(params, masks_or_None)``; params are a pure nested dict of numpy arrays.
    """
    raw = load_raw(run_dir, step)
    params = jax.tree_util.tree_map(np.asarray, raw["params"])
    masks = None if dense else find_masks(raw.get("opt_state"))
    if not dense and masks is None:
        raise ValueError(f"{run_dir}: the checkpoint holds no masks (was it a dense run?)")
    return params, masks
