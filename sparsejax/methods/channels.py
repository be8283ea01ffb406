"""Channel pruning: remove whole output channels (neurons, conv filters) and, where the model
declares which layer reads them, the matching input rows of that next layer.

A channel of a kernel is one index of its output axis: a column of a Dense ``(in, out)``
kernel, a filter ``[..., c]`` of a Conv ``(*window, Cin, Cout)`` kernel (:mod:`sparsejax.axes`).
Its score pools the scores of all its weights by L2 norm (with ``score="magnitude"``, a
norm-based filter ranking as in Li et al. 2017, "Pruning Filters for Efficient ConvNets", who
use the L1 norm). Every producing kernel keeps
exactly ``C - round(s C)`` of its ``C`` channels (``allocation="uniform"``), statically or
along a gradual schedule.

``pairs={"producer regex": "consumer replacement"}`` declares the layer that reads a
producer's channels: the consumer's path is ``re.sub(regex, replacement, producer path)``
and its input rows (contraction axis, which must have ``C`` entries) follow the producer's
channels, so a pruned neuron is removed on both sides (its bias, never pruned, then reaches
nothing). The GPT's declaration is :data:`GPT_PAIRS` (MLP ``fc_in`` channels <-> ``fc_out``
rows).

Which kernels are pruned by channel (:func:`channel_plan` lists them with reasons):

* *producers*: prunable kernels with one output axis, except the skipped ones below; a
  declared consumer is a producer only when it is itself declared as a producer in ``pairs``
  (a chain fc1 -> fc2 -> fc3). ``layers`` (a regex) restricts producers to matching paths.
* *skipped* (left dense): attention projections (a path component ``attn``, ``attention``,
  ``self_attn``, ``query``, ``key``, ``value``, ``qkv``: their channels are head dimensions
  shared between query and key, not neurons), output heads (``head``, ``lm_head``, ``logits``,
  ``unembed``, ``classifier``: their channels are the model's outputs), kernels with several
  output axes, and, without ``pairs``, nothing else. Naming a skipped kernel in ``layers`` or
  as a pair's producer is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import axes as axes_lib
from sparsejax import prunable as prunable_lib
from sparsejax.methods.base import MaskMethod, score_name
from sparsejax.methods.structured import Plan, structured_method
from sparsejax.paths import components, path_str
from sparsejax.schedules import Schedule

#: the GPT's (``sparsejax.models.gpt``) declaration: MLP hidden neurons, fc_in -> fc_out
GPT_PAIRS: dict[str, str] = {r"mlp/fc_in/kernel$": "mlp/fc_out/kernel"}
ATTENTION = ("attn", "attention", "self_attn", "self_attention", "query", "key", "value", "qkv")
HEADS = ("head", "lm_head", "logits", "unembed", "classifier")


class ChannelPlan(NamedTuple):
    """Per leaf name: ``producers`` (name -> output channel axis), ``consumers`` (name ->
    (producer, input row axis)), ``skipped`` (name -> reason)."""

    producers: dict[str, int]
    consumers: dict[str, tuple[str, int]]
    skipped: dict[str, str]


def _skip_reason(path: Any, leaf: Any) -> tuple[str | None, axes_lib.Layout | None]:
    """(why the leaf cannot lose channels or None, its layout or None when unknown)."""
    try:
        lay = axes_lib.layout(path, leaf)
    except ValueError as err:
        return f"unknown kernel layout ({err})", None
    parts = components(path)
    if any(p in ATTENTION for p in parts):
        return "attention projection (head dimensions, not neurons)", lay
    if any(p in HEADS for p in parts):
        return "output head (its channels are the model's outputs)", lay
    if len(lay.cols) != 1:
        return f"{len(lay.cols)} output axes (one is needed)", lay
    return None, lay


def channel_plan(params: Any, prunable: prunable_lib.Predicate | None = None, *,
                 pairs: Mapping[str, str] | None = None,
                 layers: str | None = None) -> ChannelPlan:
    """Which prunable kernels lose channels, which follow with input rows, which are skipped
    (module docstring); ``ValueError`` naming a pair or ``layers`` that does not fit."""
    pred = prunable_lib.resolve(prunable)
    pairs = dict(pairs or {})
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    info: dict[str, tuple[str | None, axes_lib.Layout | None, tuple[int, ...]]] = {}
    for path, leaf in flat:
        if pred(path, leaf):
            reason, lay = _skip_reason(path, leaf)
            info[path_str(path)] = (reason, lay, tuple(np.shape(leaf)))
    consumers: dict[str, tuple[str, int]] = {}
    declared: set[str] = set()
    for regex, repl in pairs.items():
        hits = [n for n in info if re.search(regex, n)]
        if not hits:
            raise ValueError(f"channels: pairs producer regex {regex!r} matches no prunable leaf")
        for prod in hits:
            reason, lay, shape = info[prod]
            if reason is not None:
                raise ValueError(f"channels: pairs producer {prod!r} is skipped: {reason}")
            cons = re.sub(regex, repl, prod)
            if cons not in info:
                raise ValueError(f"channels: consumer {cons!r} of {prod!r} (pairs {regex!r} -> "
                                 f"{repl!r}) is not a prunable leaf")
            c_lay, c_shape = info[cons][1], info[cons][2]
            channels = shape[lay.cols[0]]
            if c_lay is None or len(c_lay.rows) != 1 or c_shape[c_lay.rows[0]] != channels:
                raise ValueError(f"channels: consumer {cons!r} {c_shape} has no input axis of "
                                 f"{channels} rows for the channels of {prod!r} {shape}")
            if cons in consumers:
                raise ValueError(f"channels: {cons!r} is the consumer of two producers")
            consumers[cons] = (prod, c_lay.rows[0])
            declared.add(prod)
    producers, skipped = {}, {}
    for name, (reason, lay, _) in info.items():
        if layers is not None and not re.search(layers, name):
            if name not in consumers:
                skipped[name] = f"not matched by layers={layers!r}"
            continue
        if reason is not None:
            if layers is not None:
                raise ValueError(f"channels: layers={layers!r} names {name!r}, which is "
                                 f"skipped: {reason}")
            if name not in consumers:
                skipped[name] = reason
            continue
        if name in consumers and name not in declared:
            continue  # its rows follow its producer; its own outputs feed no declared layer
        producers[name] = lay.cols[0]
    if not producers:
        raise ValueError(f"channels: no prunable kernel can lose channels (skipped: {skipped})")
    return ChannelPlan(producers, consumers, skipped)


def _pool_channels(axis: int) -> Callable[[jax.Array], jax.Array]:
    def pool(x):
        other = tuple(a for a in range(x.ndim) if a != axis)
        return jnp.sqrt(jnp.sum(jnp.square(x), axis=other))

    return pool


def _broadcast(keep: jax.Array, axis: int, shape: tuple[int, ...]) -> jax.Array:
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return jnp.broadcast_to(keep.reshape(view), shape)


def make_plan(cp: ChannelPlan) -> Plan:
    """The :class:`~sparsejax.methods.structured.Plan` of a :class:`ChannelPlan`."""
    pool = {name: _pool_channels(axis) for name, axis in cp.producers.items()}

    def expand(kept, params, tree):
        def leaf(path, p, pr):
            if not pr:
                return jnp.bool_(True)
            name, shape = path_str(path), tuple(jnp.shape(p))
            mask = jnp.ones(shape, jnp.bool_)
            if name in kept:
                mask &= _broadcast(kept[name], cp.producers[name], shape)
            if name in cp.consumers:
                prod, axis = cp.consumers[name]
                mask &= _broadcast(kept[prod], axis, shape)
            return mask

        return jax.tree_util.tree_map_with_path(leaf, params, tree)

    return Plan(pool, expand)


def channels(
    sparsity: float,
    *,
    score: str | Callable[..., Any] = "magnitude",
    schedule: Schedule | None = None,
    pairs: Mapping[str, str] | None = None,
    layers: str | None = None,
    allocation: str = "uniform",
) -> MaskMethod:
    """Prune ``sparsity`` of the output channels of every producing kernel (module docstring).

    Args:
      sparsity: fraction of each producer's channels pruned (``"uniform"``: exactly
        ``round(s C)`` of its ``C``), or of all producers' channels (``"global"``: one
        threshold on the pooled scores). The weight sparsity is lower: skipped kernels stay
        dense (``channel_plan`` says which).
      score: ``"magnitude"``, ``"saliency"``, ``"random"`` or a callable
        ``(params, grads, key) -> pytree`` of non-negative scores; a channel's score is the L2
        norm of its weights' scores.
      schedule: ``None``: static (at ``init``; at step 0 for a score that reads gradients); a
        :class:`sparsejax.schedules.Schedule` ending at ``sparsity``: gradual, pruned channels
        never return.
      pairs: ``{"producer regex": "consumer replacement"}``: the next layer whose input rows
        follow each producer's channels (``GPT_PAIRS`` for the GPT).
      layers: a regex restricting the producers (``None``: every kernel not skipped).
    """
    if pairs is not None and not isinstance(pairs, Mapping):
        raise ValueError(f"pairs must be a mapping {{producer regex: consumer}}, got {pairs!r}")
    if layers is not None and not isinstance(layers, str):
        raise ValueError(f"layers must be a regex string or None, got {layers!r}")

    def plan(params, prunable):
        return make_plan(channel_plan(params, prunable, pairs=pairs, layers=layers))

    kind = "static" if schedule is None else "gradual"
    return structured_method(plan, sparsity, score=score, schedule=schedule,
                             allocation=allocation,
                             name=f"channels/{score_name(score)}/{kind}")
