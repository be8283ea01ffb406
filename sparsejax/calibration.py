"""Calibration statistics for post-training pruning: activation and gradient norms.

* :func:`activation_norms` ``||x_j||_2``: the L2 norm of every input feature ``j`` of every
  linear layer over all tokens of a few calibration batches, the statistic of Wanda (Sun et
  al. 2023, "A Simple and Effective Pruning Approach for Large Language Models") and of
  GBLM-Pruner (Das et al. 2023, "Beyond Size: How Gradients Shape Pruning Decisions in Large
  Language Models").
* :func:`gradient_norms` ``||g||_2``: per weight, the L2 norm over calibration sequences of the
  per-sequence loss gradients (GBLM-Pruner's gradient term).
* :func:`wanda_score` ``|w| * ||x_j||``: a :data:`sparsejax.scores.Score`, like
  :func:`sparsejax.scores.gblm_score` (which takes the same activation norms).

The model is never edited: :func:`activation_norms` clones it and installs a forward hook on
the clone's linear layers (each layer's class becomes a subclass whose ``__call__`` adds the
squared input to an :class:`ActSumSq` variable, then calls the original), so any linear-factory
layer of a given type is measured, and the caller's model keeps its class and state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax import scores as scores_lib


class ActSumSq(nnx.Variable):
    """Running sum over tokens of the squared inputs ``x_j**2`` of a hooked layer."""


_HOOKED: dict[type, type] = {}


def _hooked_class(cls: type) -> type:
    """``cls`` with a ``__call__`` that first accumulates ``sum(x**2)`` over all but the last
    axis of its input into ``self.act_sumsq``."""
    if cls not in _HOOKED:

        def __call__(self, x, *args, **kwargs):
            x32 = jnp.asarray(x).astype(jnp.float32)
            self.act_sumsq[...] = self.act_sumsq[...] + jnp.sum(
                jnp.square(x32), axis=tuple(range(x32.ndim - 1)))
            return cls.__call__(self, x, *args, **kwargs)

        _HOOKED[cls] = type(f"ActivationHooked{cls.__name__}", (cls,), {"__call__": __call__})
    return _HOOKED[cls]


def _inputs(batch: Any) -> jax.Array:
    return batch[0] if isinstance(batch, tuple | list) else batch


def activation_norms(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    layer_types: type | tuple[type, ...] = nnx.Linear,
    forward: Callable[[nnx.Module, jax.Array], Any] | None = None,
) -> dict[str, Any]:
    """Per-input-feature activation norms ``||x_j||_2`` over all tokens of ``batches``.

    Wanda (Sun et al. 2023) and GBLM-Pruner (Das et al. 2023) weight ``|w|`` by these norms.
    ``batches`` yields input arrays or ``(inputs, targets)`` tuples; ``forward(model, x)``
    runs the model (default ``model(x)``). Every submodule that is an instance of
    ``layer_types`` and takes its input ``(..., in_features)`` as first argument is measured
    (``nnx.Linear``: every layer the GPT's default linear factory builds).

    Returns a pure nested dict with the structure of ``nnx.to_pure_dict(nnx.state(model,
    nnx.Param))``: a float32 ``(in_features,)`` array at ``<layer>/kernel`` of every measured
    layer, ``None`` at every other leaf (a 1-D norm indexes axis -2 of the kernel, its input
    axis; see :func:`sparsejax.scores.gblm`). The model passed in is not modified.
    """
    clone = nnx.clone(model)
    hooked: list[tuple[tuple[Any, ...], nnx.Module]] = []
    for path, module in nnx.iter_modules(clone):
        if isinstance(module, layer_types):
            kernel = getattr(module, "kernel", None)
            if kernel is None or jnp.ndim(kernel[...]) < 2:
                raise ValueError(f"activation_norms: layer {'/'.join(map(str, path))} "
                                 f"({type(module).__name__}) has no kernel of ndim >= 2")
            module.__class__ = _hooked_class(type(module))
            module.act_sumsq = ActSumSq(jnp.zeros(kernel[...].shape[-2], jnp.float32))
            hooked.append((tuple(path), module))
    if not hooked:
        raise ValueError(f"activation_norms: the model holds no layer of type {layer_types}")
    run = forward or (lambda m, x: m(x))

    @nnx.jit
    def step(m, x):
        run(m, x)

    n = 0
    for batch in batches:
        step(clone, jnp.asarray(_inputs(batch)))
        n += 1
    if n == 0:
        raise ValueError("activation_norms: batches is empty; pass at least one batch")
    norms = {path: jnp.sqrt(m.act_sumsq[...]) for path, m in hooked}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def leaf(path, _):
        keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        return norms.get(keys[:-1]) if keys[-1] == "kernel" else None

    return jax.tree_util.tree_map_with_path(leaf, params)


def gradient_norms(
    model: nnx.Module,
    batches: Iterable[tuple[Any, Any]],
    loss: Callable[[nnx.Module, jax.Array, jax.Array], jax.Array],
) -> dict[str, Any]:
    """``sqrt(sum_n g_n**2)`` per weight: ``g_n`` the gradient of ``loss(model, x_n, y_n)``
    for every calibration sequence ``n`` (one row of each ``(inputs, targets)`` batch),
    GBLM-Pruner's gradient term (Das et al. 2023). Returns a pure dict shaped like
    ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``; the model is not modified."""
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(state)
    params_def = jax.tree_util.tree_structure(state)

    def seq_loss(p, x_L, y_L):
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(params_def, jax.tree.leaves(p)),
                      rest)
        return loss(m, x_L[None], y_L[None])

    @jax.jit
    def batch_sumsq(p, acc, x_BxL, y_BxL):
        def body(acc, xy):
            g = jax.grad(seq_loss)(p, xy[0], xy[1])
            return jax.tree.map(lambda a, gi: a + jnp.square(gi.astype(jnp.float32)), acc, g), None

        return jax.lax.scan(body, acc, (x_BxL, y_BxL))[0]

    acc = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), params)
    n = 0
    for x, y in batches:
        acc = batch_sumsq(params, acc, jnp.asarray(x), jnp.asarray(y))
        n += 1
    if n == 0:
        raise ValueError("gradient_norms: batches is empty; pass at least one batch")
    return jax.tree.map(jnp.sqrt, acc)


def wanda(params: Any, grads: Any = None, key: Any = None, *, act_norms: Any) -> Any:
    """Wanda (Sun et al. 2023): ``|w| * ||x_j||``, ``act_norms`` as for
    :func:`sparsejax.scores.gblm` (a 1-D norm scales row ``j`` of an ``(in, out)`` kernel;
    leaves whose norm is ``None`` score 0). ``grads`` and ``key`` are ignored.

    >>> w = {"k": jnp.array([[1.0, -2.0], [3.0, 4.0]])}
    >>> wanda(w, act_norms={"k": jnp.array([2.0, 0.5])})["k"].tolist()
    [[2.0, 4.0], [1.5, 2.0]]
    """
    del grads, key
    if act_norms is None:
        raise ValueError("act_norms is required by the 'wanda' score, got None")
    zeros = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), params)
    return scores_lib.gblm(params, zeros, act_norms=act_norms, alpha=0.0)


def wanda_score(act_norms: Any) -> scores_lib.Score:
    """:func:`wanda` with its activation norms bound: a :data:`sparsejax.scores.Score`."""
    if act_norms is None:
        raise ValueError("act_norms is required by the 'wanda' score, got None")

    def score(params: Any, grads: Any = None, key: Any = None) -> Any:
        return wanda(params, grads, key, act_norms=act_norms)

    return score
