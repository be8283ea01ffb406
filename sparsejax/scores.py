"""Importance scores: ``score(params, grads, key) -> pytree of float32`` shaped like params.

Higher scores are kept. Every score is a pure jnp function, so it runs inside ``jit``.

* :func:`magnitude` ``|w|`` (Han et al. 2015, "Learning both Weights and Connections").
* :func:`random` ``U(0, 1)`` per entry, an independent stream per leaf keyed by its path
  (random pruning, e.g. the static sparse phase of SPDF, Thangarasa et al. 2023).
* :func:`saliency` ``|w * g|``: the connection sensitivity of SNIP (Lee et al. 2019) and the
  first-order Taylor importance of Molchanov et al. 2019.
* :func:`gblm` ``|w| * (||x_j|| + alpha * |g|)`` (GBLM-Pruner, Das et al. 2023), given the
  per-input-feature activation norms ``||x_j||``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.paths import path_str

Score = Callable[[Any, Any, Any], Any]


def _require(name: str, value: Any, score: str) -> None:
    if value is None:
        raise ValueError(f"{name} is required by the {score!r} score, got None")


def magnitude(params: Any, grads: Any = None, key: Any = None) -> Any:
    """``|w|`` (Han et al. 2015). ``grads`` and ``key`` are ignored.

    >>> magnitude({"w": jnp.array([-2.0, 1.0])})["w"].tolist()
    [2.0, 1.0]
    """
    del grads, key
    return jax.tree.map(lambda w: jnp.abs(w).astype(jnp.float32), params)


def leaf_key(key: jax.Array, path: Any) -> jax.Array:
    """``fold_in(key, crc32(path_str(path)) & 0x7FFFFFFF)``: a leaf's own key, a stable function
    of its path alone (the same across runs, processes and tree edits elsewhere)."""
    name = path_str(path).encode()
    return jax.random.fold_in(key, zlib.crc32(name) & 0x7FFFFFFF)


def random(params: Any, grads: Any = None, key: Any = None) -> Any:
    """Uniform ``U(0, 1)`` scores; each leaf draws from :func:`leaf_key` of its path, so adding
    or removing other leaves (a bias, a norm scale) does not change a leaf's scores.

    >>> s = random({"a": jnp.zeros((2, 2)), "b": jnp.zeros(3)}, key=jax.random.key(0))
    >>> s["a"].shape, s["b"].dtype
    ((2, 2), dtype('float32'))
    """
    del grads
    _require("key", key, "random")
    return jax.tree_util.tree_map_with_path(
        lambda path, w: jax.random.uniform(leaf_key(key, path), jnp.shape(w), jnp.float32), params
    )


def saliency(params: Any, grads: Any, key: Any = None) -> Any:
    """``|w * g|``: SNIP's connection sensitivity (Lee et al. 2019) / first-order Taylor
    importance (Molchanov et al. 2019). ``grads`` is required.

    >>> saliency({"w": jnp.array([2.0, -3.0])}, {"w": jnp.array([0.5, 1.0])})["w"].tolist()
    [1.0, 3.0]
    """
    del key
    _require("grads", grads, "saliency")
    return jax.tree.map(
        lambda w, g: jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32)), params, grads
    )


def _act_term(norm: Any, w: jax.Array) -> jax.Array | float:
    """Broadcast an activation-norm leaf onto ``w``: a 1-D norm indexes the input axis
    (axis -2: axis 0 of a Flax ``(in, out)`` kernel, ``in`` of an ``HWIO`` conv kernel)."""
    if norm is None:
        return 0.0
    norm = jnp.asarray(norm, jnp.float32)
    shape = jnp.shape(w)
    if norm.ndim == 1 and len(shape) >= 2:
        if norm.shape[0] != shape[-2]:
            raise ValueError(
                f"act_norms: a leaf of shape {shape} needs {shape[-2]} input-feature norms "
                f"(axis -2), got {norm.shape[0]}"
            )
        return norm[:, None]
    try:
        return jnp.broadcast_to(norm, shape)
    except ValueError as err:
        raise ValueError(
            f"act_norms: a leaf of shape {norm.shape} does not broadcast to {shape}"
        ) from err


def gblm(params: Any, grads: Any, key: Any = None, *, act_norms: Any, alpha: float = 1.0) -> Any:
    """GBLM-Pruner (Das et al. 2023): ``|w| * (||x_j|| + alpha * |g|)``.

    ``act_norms`` is a pytree with params' structure (or a prefix of it, ``None`` for leaves
    without one) holding per-input-feature activation norms ``||x_j||_2`` over a calibration
    set. A 1-D norm broadcasts along axis -2 of the weight (the input axis of a Flax
    ``(in, out)`` kernel: ``x[j]`` scales row ``j``); other shapes must broadcast to the weight.
    ``|g|`` stands for the gradient norm over calibration samples when ``grads`` holds it;
    the paper sets ``alpha`` to scale the gradient term (``1.0`` here by default).

    >>> w = {"k": jnp.array([[1.0, -1.0], [2.0, 0.5]])}
    >>> g = {"k": jnp.zeros((2, 2))}
    >>> gblm(w, g, act_norms={"k": jnp.array([3.0, 1.0])})["k"].tolist()
    [[3.0, 3.0], [2.0, 0.5]]
    """
    del key
    _require("grads", grads, "gblm")
    _require("act_norms", act_norms, "gblm")

    def leaf(norm, w, g):
        term = _act_term(norm, w)
        return jnp.abs(w).astype(jnp.float32) * (term + alpha * jnp.abs(g).astype(jnp.float32))

    def subtree(norm, w_sub, g_sub):  # act_norms may be a prefix: one norm for a subtree
        return jax.tree.map(lambda w, g: leaf(norm, w, g), w_sub, g_sub)

    norms_def = jax.tree_util.tree_structure(act_norms, is_leaf=lambda x: x is None)
    try:  # one norm (or None) per params subtree: act_norms is params' structure or a prefix
        w_subs, g_subs = norms_def.flatten_up_to(params), norms_def.flatten_up_to(grads)
    except ValueError as err:
        raise ValueError(f"act_norms must have the structure of params: {err}") from err
    norms = jax.tree_util.tree_leaves(act_norms, is_leaf=lambda x: x is None)
    return norms_def.unflatten([subtree(n, w, g) for n, w, g in zip(norms, w_subs, g_subs,
                                                                   strict=True)])


def gblm_score(act_norms: Any, *, alpha: float = 1.0) -> Score:
    """:func:`gblm` with its activation norms bound: a :data:`Score`."""
    _require("act_norms", act_norms, "gblm")

    def score(params: Any, grads: Any, key: Any = None) -> Any:
        return gblm(params, grads, key, act_norms=act_norms, alpha=alpha)

    return score


_SCORES: dict[str, Score] = {"magnitude": magnitude, "random": random, "saliency": saliency}


def get(name: str) -> Score:
    """The score named ``name`` (``magnitude``, ``random`` or ``saliency``).

    >>> get("magnitude") is magnitude
    True
    """
    if name not in _SCORES:
        raise ValueError(f"score must be one of {sorted(_SCORES)}, got {name!r}")
    return _SCORES[name]
