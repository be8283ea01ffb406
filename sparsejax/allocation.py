"""Allocating a target sparsity over the prunable leaves of a parameter pytree.

Every function returns a pytree shaped like ``params`` whose leaves are Python floats: the
sparsity of each prunable leaf, ``0.0`` for the others. :func:`allocator` returns the same
allocations as a jittable function of a (possibly traced) target sparsity.

* :func:`uniform`: every prunable leaf at ``s``.
* :func:`erk`: Erdős–Rényi-Kernel (Evci et al. 2020, "Rigging the Lottery"; after Mocanu et al.
  2018): density_l = eps * raw_l with raw_l = (sum(shape_l) / prod(shape_l)) ** power_scale.
  ``eps`` is chosen so that the number of kept weights equals that of uniform pruning,
  ``sum_l n_l - floor(s * n_l)``. Leaves whose density would exceed 1 are made dense (all
  those tied at the largest raw_l at once) and ``eps`` recomputed, as JaxPruner's
  ``sparsity_distributions.get_sparsities_erdos_renyi`` does.
* :func:`er`: Erdős–Rényi, the same with only the last two dims (fan-in, fan-out of a conv
  kernel) in raw_l.
* :func:`explicit`: a dict of per-leaf sparsities keyed by :func:`sparsejax.prunable.path_str`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import prunable as _prunable
from sparsejax.checks import sparsity as _check_sparsity
from sparsejax.paths import path_str

Predicate = _prunable.Predicate
NAMES = ("uniform", "erk", "er")


def _check_power(power_scale: Any) -> float:
    if isinstance(power_scale, bool) or not isinstance(power_scale, int | float):
        raise ValueError(f"power_scale must be a finite number >= 0, got {power_scale!r}")
    if not (math.isfinite(power_scale) and power_scale >= 0):
        raise ValueError(f"power_scale must be a finite number >= 0, got {power_scale}")
    return float(power_scale)


def _selected(params: Any, prunable: Predicate | None) -> tuple[list, Any, list[bool]]:
    """(leaves with paths, treedef, prunable flags) after checking something is selected."""
    mask_tree = _prunable.check_selects_something(params, prunable)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    flags = jax.tree_util.tree_leaves(mask_tree)
    return flat, treedef, [bool(f) for f in flags]


def _raw(shape: tuple[int, ...], power_scale: float, last_two: bool) -> float:
    dims = tuple(shape[-2:]) if last_two else tuple(shape)
    return (sum(dims) / math.prod(dims)) ** power_scale


def _erk_sparsities(sizes: list[int], raws: list[float], s: float) -> list[float]:
    """JaxPruner's ERK loop in float64 (see the module docstring)."""
    zeros = [math.floor(s * n) for n in sizes]
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(sizes)) if i not in dense]
        if not rest:  # only when s is ~0: every leaf dense
            return [0.0] * len(sizes)
        rhs = sum(sizes[i] - zeros[i] for i in rest) - sum(zeros[i] for i in dense)
        divisor = sum(raws[i] * sizes[i] for i in rest)
        eps = rhs / divisor
        max_raw = max(raws[i] for i in rest)
        if max_raw * eps <= 1:
            break
        dense |= {i for i in rest if raws[i] == max_raw}
    return [
        0.0 if i in dense else min(max(1.0 - eps * raws[i], 0.0), 1.0) for i in range(len(sizes))
    ]


def uniform(params: Any, sparsity: float, *, prunable: Predicate | None = None) -> Any:
    """Every prunable leaf at ``sparsity`` (Zhu & Gupta 2017's layer-wise default).

    >>> uniform({"w": np.zeros((2, 3)), "bias": np.zeros(3)}, 0.5)
    {'bias': 0.0, 'w': 0.5}
    """
    s = _check_sparsity("sparsity", sparsity)
    flat, treedef, flags = _selected(params, prunable)
    return jax.tree_util.tree_unflatten(treedef, [s if f else 0.0 for f in flags])


def _erdos_renyi(params, sparsity, power_scale, prunable, last_two) -> Any:
    s = _check_sparsity("sparsity", sparsity)
    p = _check_power(power_scale)
    flat, treedef, flags = _selected(params, prunable)
    idx = [i for i, f in enumerate(flags) if f]
    shapes = [tuple(flat[i][1].shape) for i in idx]
    result = _erk_sparsities(
        [math.prod(sh) for sh in shapes], [_raw(sh, p, last_two) for sh in shapes], s
    )
    out = [0.0] * len(flags)
    for i, v in zip(idx, result, strict=True):
        out[i] = float(v)
    return jax.tree_util.tree_unflatten(treedef, out)


def erk(
    params: Any, sparsity: float, *, power_scale: float = 1.0, prunable: Predicate | None = None
) -> Any:
    """Erdős–Rényi-Kernel allocation (Evci et al. 2020); ``power_scale < 1`` softens it.

    >>> params = {"a": np.zeros((4, 4)), "b": np.zeros((64, 64))}
    >>> {k: round(v, 4) for k, v in erk(params, 0.5).items()}
    {'a': 0.0, 'b': 0.502}
    """
    return _erdos_renyi(params, sparsity, power_scale, prunable, last_two=False)


def er(
    params: Any, sparsity: float, *, power_scale: float = 1.0, prunable: Predicate | None = None
) -> Any:
    """Erdős–Rényi allocation (Mocanu et al. 2018): like :func:`erk` on the last two dims only.

    >>> params = {"conv": np.zeros((3, 3, 8, 8)), "fc": np.zeros((8, 8))}
    >>> {k: round(v, 4) for k, v in er(params, 0.5).items()}
    {'conv': 0.5, 'fc': 0.5}
    """
    return _erdos_renyi(params, sparsity, power_scale, prunable, last_two=True)


def explicit(
    params: Any,
    per_leaf: dict[str, float],
    *,
    prunable: Predicate | None = None,
    default: float = 0.0,
) -> Any:
    """Per-leaf sparsities by name (``path_str`` of the leaf); other prunable leaves get
    ``default``. Naming an unknown or non-prunable leaf raises ``ValueError``.

    >>> explicit({"w": np.zeros((2, 3)), "v": np.zeros((3, 3))}, {"w": 0.25})
    {'v': 0.0, 'w': 0.25}
    """
    d = _check_sparsity("default", default)
    flat, treedef, flags = _selected(params, prunable)
    names = [path_str(path) for path, _ in flat]
    valid = {n for n, f in zip(names, flags, strict=True) if f}
    for key, value in per_leaf.items():
        if key not in valid:
            raise ValueError(
                f"per_leaf: {key!r} is not a prunable leaf; valid names are {sorted(valid)}"
            )
        _check_sparsity(f"per_leaf[{key!r}]", value)
    out = [float(per_leaf.get(n, d)) if f else 0.0 for n, f in zip(names, flags, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def allocator(
    name: str, params: Any, *, prunable: Predicate | None = None, power_scale: float = 1.0
) -> Callable[[jax.Array], Any]:
    """A jittable ``s -> per-leaf float32 sparsities`` for ``name`` in ``uniform, erk, er``.

    Equal to the Python functions (to float32 precision) for every ``s``; the ERK loop runs a
    fixed number of iterations (the number of prunable leaves), so ``s`` may be traced.

    >>> alloc = allocator("erk", {"a": np.zeros((4, 4)), "b": np.zeros((64, 64))})
    >>> {k: round(float(v), 4) for k, v in jax.jit(alloc)(0.5).items()}
    {'a': 0.0, 'b': 0.502}
    """
    if name not in NAMES:
        raise ValueError(f"allocation name must be one of {list(NAMES)}, got {name!r}")
    p = _check_power(power_scale)
    flat, treedef, flags = _selected(params, prunable)
    idx = [i for i, f in enumerate(flags) if f]
    shapes = [tuple(flat[i][1].shape) for i in idx]
    sizes = jnp.asarray([math.prod(sh) for sh in shapes], jnp.float32)
    raws = jnp.asarray([_raw(sh, p, name == "er") for sh in shapes], jnp.float32)

    def per_leaf(s: jax.Array) -> jax.Array:
        s = jnp.asarray(s, jnp.float32)
        if name == "uniform":
            return jnp.full(sizes.shape, s)
        zeros = jnp.floor(s * sizes)

        def eps_of(dense):
            rhs = jnp.sum(jnp.where(dense, -zeros, sizes - zeros))
            divisor = jnp.sum(jnp.where(dense, 0.0, raws * sizes))
            return rhs / jnp.where(divisor > 0, divisor, 1.0)

        def body(_, dense):
            max_raw = jnp.max(jnp.where(dense, -jnp.inf, raws))
            grow = (max_raw * eps_of(dense) > 1) & ~dense & (raws == max_raw)
            return dense | grow

        dense = jax.lax.fori_loop(0, len(idx), body, jnp.zeros(sizes.shape, bool))
        return jnp.where(dense, 0.0, jnp.clip(1.0 - eps_of(dense) * raws, 0.0, 1.0))

    def fn(s: jax.Array) -> Any:
        values = per_leaf(s)
        out = [jnp.zeros((), jnp.float32)] * len(flags)
        for j, i in enumerate(idx):
            out[i] = values[j]
        return jax.tree_util.tree_unflatten(treedef, out)

    return fn
