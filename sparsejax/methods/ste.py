"""Straight-through N:M training: dense weights, N:M-sparse forward passes.

* ``ste(n, m)``: the forward pass uses ``W * E`` with ``E`` the N:M mask of ``|W|``, recomputed
  every step; the gradient reaches every weight unchanged (straight-through estimator, Bengio
  et al. 2013, as used for N:M by Zhou et al. 2021).
* ``sr_ste(n, m, decay=2e-4)``: SR-STE (Zhou et al. 2021, "Learning N:M Fine-grained
  Structured Sparse Neural Networks From Scratch"): ``grad += decay * (1 - E) * W``, which
  pulls the pruned weights towards 0 so the mask settles.
* ``mdgf(n, m, alpha, kind)``: mask-decay gradient flow (Bambhaniya et al. 2024, "Progressive
  Gradient Flow for Robust N:M Sparsity Training in Transformers"): forward
  ``W * (E + (1 - E) beta_t)``, ``beta_t = max(0, 1 - alpha t)`` (``"linear"``) or
  ``exp(-alpha t)`` (``"exp"``), backward straight-through (``jax.custom_vjp`` in
  ``sparsejax.forward_params``).
* ``sdgf(frames, kind)``: structure-decay gradient flow (same paper): the N:M pattern tightens
  frame by frame, ``"stepwise"`` ``7:8 -> 4:8 -> 2:8 -> 1:8`` (N halves, M fixed) or
  ``"geometric"`` ``8N:8M -> 4N:4M -> 2N:2M -> N:M`` (density fixed, groups shrink).

All take ``dense_steps`` (a dense warm-up: all-true masks before it) and ``hard_from`` (from
that step the masks are hard: pruned weights land at 0 and stop training). Masks group along
each kernel's contraction axes (``axis="contraction"``, see :mod:`sparsejax.axes`). The
training loop trains every method through the same step on ``sparsejax.forward_params``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import masks as masks_lib
from sparsejax import prunable as prunable_lib
from sparsejax.axes import AxisSpec, check_spec
from sparsejax.methods.base import MaskMethod, dense_masks, periodic


def _check_step(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _straight_through_nm(
    patterns: Sequence[tuple[int, int]],
    starts: Sequence[int],
    *,
    axis: AxisSpec,
    hard_from: int | None,
    pruned_weight=None,
    adjust_grads=None,
    name: str,
) -> MaskMethod:
    """N:M masks of ``|W|`` at every step: ``patterns[k]`` from ``starts[k]`` on (dense before
    ``starts[0]``), straight-through until ``hard_from``."""
    for n, m in patterns:
        masks_lib.check_nm(n, m)
    check_spec(axis)
    if hard_from is not None:
        _check_step("hard_from", hard_from, starts[0] + 1)
    starts_arr = jnp.asarray(starts, jnp.int32)

    def nm_of(params, tree, n, m):
        return masks_lib.nm_masks(jax.tree.map(jnp.abs, params), n, m, tree, axis=axis)

    def init(params, key, prunable):
        del key
        tree = prunable_lib.prunable_tree(params, prunable)
        for _, m in patterns:  # every pattern must fit every kernel: one error names them all
            masks_lib.nm_plan(params, m, tree, axis=axis)
        if starts[0] > 0:
            return dense_masks(params, prunable), ()
        n, m = patterns[0]
        return nm_of(params, tree, n, m), ()  # sparse forward from step 0

    def update(params, grads, masks, state, step, key, prunable):
        del grads, masks, key
        tree = prunable_lib.prunable_tree(params, prunable)
        frame = jnp.sum(step >= starts_arr) - 1  # -1: the dense warm-up
        branches = [lambda p: dense_masks(p, prunable)]
        branches += [lambda p, n=n, m=m: nm_of(p, tree, n, m) for n, m in patterns]
        return jax.lax.switch(frame + 1, branches, params), state

    def target(step):
        frame = jnp.sum(jnp.asarray(step) >= starts_arr) - 1
        values = jnp.asarray([0.0] + [1.0 - n / m for n, m in patterns], jnp.float32)
        return values[frame + 1]

    last = hard_from if hard_from is not None else None
    n, m = patterns[-1]
    return MaskMethod(
        init, update, periodic(1, 0, last), target=target, name=name,
        straight_through=True, pruned_weight=pruned_weight, adjust_grads=adjust_grads,
        hard_from=hard_from,
    )


def ste(n: int, m: int, *, axis: AxisSpec = "contraction", dense_steps: int = 0,
        hard_from: int | None = None) -> MaskMethod:
    """Straight-through N:M: forward ``W * E``, gradient to every weight (see module doc)."""
    _check_step("dense_steps", dense_steps, 0)
    return _straight_through_nm([(n, m)], [dense_steps], axis=axis, hard_from=hard_from,
                                name=f"ste/{n}:{m}")


def sr_ste(n: int, m: int, *, decay: float = 2e-4, axis: AxisSpec = "contraction",
           dense_steps: int = 0, hard_from: int | None = None) -> MaskMethod:
    """SR-STE (Zhou et al. 2021): straight-through N:M with ``grad += decay (1 - E) W``."""
    if not (isinstance(decay, int | float) and not isinstance(decay, bool) and decay >= 0
            and math.isfinite(decay)):
        raise ValueError(f"decay must be a finite float >= 0, got {decay!r}")
    _check_step("dense_steps", dense_steps, 0)

    def adjust(grads, params, masks):
        return jax.tree.map(
            lambda g, w, e: g + decay * jnp.where(e, 0.0, w).astype(g.dtype), grads, params,
            masks)

    return _straight_through_nm([(n, m)], [dense_steps], axis=axis, hard_from=hard_from,
                                adjust_grads=adjust, name=f"sr_ste/{n}:{m}")


def mdgf(n: int, m: int, *, alpha: float, kind: str = "linear", axis: AxisSpec = "contraction",
         dense_steps: int = 0, hard_from: int | None = None) -> MaskMethod:
    """MDGF (Bambhaniya et al. 2024): forward ``W (E + (1 - E) beta_t)`` with ``beta_t =
    max(0, 1 - alpha t)`` (``kind="linear"``) or ``exp(-alpha t)`` (``"exp"``), ``t`` counted
    from the end of the dense warm-up; backward straight-through."""
    if not (isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha > 0
            and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite float > 0, got {alpha!r}")
    if kind not in ("linear", "exp"):
        raise ValueError(f"kind must be 'linear' or 'exp', got {kind!r}")
    _check_step("dense_steps", dense_steps, 0)

    def beta(step):
        t = jnp.maximum(jnp.asarray(step, jnp.float32) - dense_steps, 0.0)
        return jnp.maximum(0.0, 1.0 - alpha * t) if kind == "linear" else jnp.exp(-alpha * t)

    return _straight_through_nm([(n, m)], [dense_steps], axis=axis, hard_from=hard_from,
                                pruned_weight=beta, name=f"mdgf/{n}:{m}/{kind}")


def sdgf_patterns(n: int, m: int, frames: int, kind: str) -> list[tuple[int, int]]:
    """The N:M pattern of each frame, ending at ``n:m``.

    >>> sdgf_patterns(1, 8, 4, "stepwise"), sdgf_patterns(1, 8, 4, "geometric")
    ([(7, 8), (4, 8), (2, 8), (1, 8)], [(8, 64), (4, 32), (2, 16), (1, 8)])
    """
    scale = [2 ** (frames - 1 - k) for k in range(frames)]
    if kind == "stepwise":
        return [(min(m - 1, n * s) if s > 1 else n, m) for s in scale]
    if kind == "geometric":
        return [(n * s, m * s) for s in scale]
    raise ValueError(f"kind must be 'stepwise' or 'geometric', got {kind!r}")


def sdgf(frames: Sequence[int], *, kind: str = "stepwise", n: int = 1, m: int = 8,
         axis: AxisSpec = "contraction", hard_from: int | None = None) -> MaskMethod:
    """SDGF (Bambhaniya et al. 2024): frame ``k`` starts at ``frames[k]`` (dense before
    ``frames[0]``) and uses ``sdgf_patterns(n, m, len(frames), kind)[k]``, straight-through."""
    starts = [_check_step(f"frames[{i}]", f, 0) for i, f in enumerate(frames)]
    if not starts or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(f"frames must be a non-empty increasing list of steps, got {frames!r}")
    masks_lib.check_nm(n, m)
    patterns = sdgf_patterns(n, m, len(starts), kind)
    return _straight_through_nm(patterns, starts, axis=axis, hard_from=hard_from,
                                name=f"sdgf/{n}:{m}/{kind}")
