"""Fixed masks: train with a given mask pytree kept exactly (sparse fine-tuning).

The sparse fine-tuning half of SPDF (Thangarasa et al. 2023, "SPDF: Sparse Pre-training and
Dense Fine-tuning for Large Language Models") and of any "prune, then fine-tune" recipe: the
masks come from a checkpoint, a one-shot pruner or a file, and never change.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import prunable as prunable_lib
from sparsejax.methods.base import MaskMethod, constant_target, never


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _normalized(tree: Any) -> dict[tuple[str, ...], Any]:
    """Leaves by path, every key as a string: checkpoints turn int dict keys into '0', '1'."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _as_bool(name: str, mask: Any) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        if not np.all((m == 0) | (m == 1)):
            raise ValueError(f"fixed: mask of {name!r} must be boolean or 0/1, got dtype {m.dtype}")
        m = m.astype(bool)
    return m


def align_masks(masks: Any, params: Any, prunable: prunable_lib.Predicate) -> Any:
    """``masks`` rebuilt on the tree of ``params``: bool arrays on prunable leaves, scalar
    ``True`` elsewhere. Dict keys are matched as strings, so masks restored from a checkpoint
    (``'0'`` where params have ``0``) align. Raises ``ValueError`` naming every leaf that is
    missing, extra, of another shape, or pruned although the predicate keeps it dense."""
    given = _normalized(masks)
    out, problems, used = [], [], set()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in leaves:
        key = tuple(_key_name(k) for k in path)
        name = "/".join(key)
        is_prunable = bool(prunable(path, leaf))
        if key not in given:
            problems.append(f"{name}: no mask given")
            out.append(jnp.bool_(True))
            continue
        used.add(key)
        m = _as_bool(name, given[key])
        if m.ndim == 0:
            if not m and is_prunable:
                problems.append(f"{name}: scalar False mask (would prune the whole leaf)")
            out.append(jnp.ones(np.shape(leaf), jnp.bool_) if is_prunable else jnp.bool_(True))
        elif m.shape != tuple(np.shape(leaf)):
            problems.append(f"{name}: mask shape {m.shape}, param shape {tuple(np.shape(leaf))}")
            out.append(jnp.bool_(True))
        elif not is_prunable:
            if not m.all():
                problems.append(f"{name}: not prunable under the predicate but its mask prunes "
                                f"{int((~m).sum())} entries")
            out.append(jnp.bool_(True))
        else:
            out.append(jnp.asarray(m))
    extra = sorted("/".join(k) for k in set(given) - used)
    problems += [f"{name}: mask for a leaf params do not have" for name in extra]
    if problems:
        raise ValueError("fixed: masks do not match params: " + "; ".join(problems))
    return treedef.unflatten(out)


def fixed(masks: Any) -> MaskMethod:
    """Keep the given ``masks`` (bool pytree shaped like params, e.g. ``sparsejax.masks_of``
    of a pre-training run, possibly restored from a checkpoint) for the whole run.

    >>> # tx = sparsejax.sparsify(optax.adamw(1e-4), methods.fixed(masks))
    """
    flat = [_as_bool("/".join(k), v) for k, v in _normalized(masks).items()]
    arrays = [m for m in flat if m.ndim]
    if not arrays:
        raise ValueError("fixed: masks hold no array leaf, so they prune nothing")
    total = sum(m.size for m in arrays)
    sparsity = 1.0 - sum(int(m.sum()) for m in arrays) / total

    def init(params, key, prunable):
        del key
        return align_masks(masks, params, prunable), ()

    def update(params, grads, masks_, state, step, key, prunable):  # never called: cadence
        del params, grads, step, key, prunable
        return masks_, state

    return MaskMethod(init, update, never, target=constant_target(sparsity), name="fixed")
