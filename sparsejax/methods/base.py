"""The ``MaskMethod`` protocol: how a pruning method plugs into :func:`sparsejax.sparsify`.

A method is a NamedTuple of pure functions plus declared data (optax style, docs/design.md,
"Optimizer side"):

- ``init(params, key, prunable) -> (masks, state)``
- ``update(params, grads, masks, state, step, key, prunable) -> (masks, state)``, called only
  on the steps its :class:`Cadence` names (under ``lax.cond``, or unconditionally when the
  cadence is every step);
- ``cadence``: *when* masks are recomputed: :data:`never` (fixed after ``init``),
  :data:`always` (every step), :func:`periodic` or :func:`following` a sparsity schedule;
- ``target(step) -> float32 scalar``: the sparsity the method aims at during ``step`` (what
  the training loop logs as the target; measured sparsity comes from the masks).

``prunable`` is the predicate ``(path, leaf) -> bool`` resolved by ``sparsify``. Masks are
pytrees shaped like params: prunable leaves hold bool arrays of the leaf's shape, others a
scalar ``True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax import prunable as prunable_lib
from sparsejax import scores as scores_lib

Params = Any
Masks = Any


class Cadence(NamedTuple):
    """The steps on which a method recomputes its masks.

    ``update_every=None``: never after ``init``. Otherwise every ``update_every`` steps from
    ``begin_step`` up to (not including) ``end_step`` (``None``: forever). When ``schedule`` is
    given, its own ``is_update_step`` decides (schedules place updates irregularly, e.g.
    ``polynomial`` also updates at ``end_step``, ``iterative`` at listed steps); the other
    fields then describe the schedule's window. ``schedule`` may be any object with a
    jittable ``is_update_step(step)`` and an ``end_step`` (``methods.spdf`` combines two).
    """

    update_every: int | None  # None: masks fixed after init
    begin_step: int = 0
    end_step: int | None = None  # first step after the updates; None: no end
    schedule: Any = None  # a sparsejax.schedules.Schedule whose update steps are followed

    @property
    def fixed(self) -> bool:
        """True when masks never change after ``init``."""
        return self.update_every is None

    @property
    def every_step(self) -> bool:
        """True when masks are recomputed at every step (``sparsify`` then skips the cond)."""
        return (self.update_every == 1 and self.begin_step == 0 and self.end_step is None
                and (self.schedule is None or self.schedule.end_step is None))

    def is_update_step(self, step: jax.Array) -> jax.Array:
        """Whether masks are recomputed at ``step`` (jittable bool scalar)."""
        step = jnp.asarray(step)
        if self.fixed:
            return jnp.zeros(step.shape, jnp.bool_)
        if self.schedule is not None:
            return jnp.asarray(self.schedule.is_update_step(step))
        ok = (step >= self.begin_step) & ((step - self.begin_step) % self.update_every == 0)
        return ok if self.end_step is None else ok & (step < self.end_step)


never = Cadence(update_every=None)
"""Cadence of a method whose masks are fixed after ``init``."""

always = Cadence(update_every=1)
"""Cadence of a method that recomputes its masks at every step."""


def periodic(update_every: int, begin_step: int = 0, end_step: int | None = None) -> Cadence:
    """Every ``update_every`` steps from ``begin_step``, before ``end_step`` (if given)."""
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
    if isinstance(begin_step, bool) or not isinstance(begin_step, int) or begin_step < 0:
        raise ValueError(f"begin_step must be an int >= 0, got {begin_step!r}")
    if end_step is not None and (not isinstance(end_step, int) or end_step <= begin_step):
        raise ValueError(f"end_step must be None or an int > begin_step, got {end_step!r}")
    return Cadence(update_every, begin_step, end_step)


def following(schedule: Any) -> Cadence:
    """The update steps of a :class:`sparsejax.schedules.Schedule` (declared by the schedule)."""
    return Cadence(schedule.update_every, schedule.begin_step, schedule.end_step, schedule)


def constant_target(sparsity: float) -> Callable[[jax.Array], jax.Array]:
    """``target`` of a method aiming at one sparsity throughout."""
    value = float(sparsity)
    return lambda step: jnp.full(jnp.shape(step), value, jnp.float32)


class MaskMethod(NamedTuple):
    """Pure functions that compute masks, with their declared cadence and target sparsity.

    Straight-through methods (``straight_through=True``: STE, SR-STE, MDGF, SDGF) keep dense
    weights: the forward pass sees ``sparsejax.forward_params`` = ``W * (E + (1 - E) beta_t)``
    with ``beta_t = pruned_weight(t)`` (0 when ``None``), the gradient reaches every weight
    unmasked (``adjust_grads(grads, params, masks)`` may refine it, as SR-STE does), and from
    ``hard_from`` on (if given) the masks become hard: pruned weights land at 0 and train no
    more.

    ``hold_grown=True`` (SET and RigL by default, as in their reference implementation): the
    entries a mask update turns on stay at exactly 0 through the step that grows them, with no
    gradient reaching the inner optimizer; they train from the next step.
    """

    init: Callable[..., tuple[Masks, Any]]
    update: Callable[..., tuple[Masks, Any]]
    cadence: Cadence
    target: Callable[[jax.Array], jax.Array] = constant_target(0.0)
    name: str = "custom"
    straight_through: bool = False  # grads of pruned weights reach the inner optimizer
    pruned_weight: Callable[[jax.Array], jax.Array] | None = None  # forward weight of pruned
    adjust_grads: Callable[[Any, Any, Masks], Any] | None = None  # (grads, params, masks)
    hard_from: int | None = None  # straight-through until this step, hard masks from it on
    hold_grown: bool = False  # grown entries skip the update of the step that grows them


def check_method(method: Any) -> MaskMethod:
    """Raise ``ValueError`` unless ``method`` is a well-formed :class:`MaskMethod`."""
    if not isinstance(method, MaskMethod):
        raise ValueError(f"method must be a sparsejax MaskMethod, got {type(method)!r}")
    if not isinstance(method.cadence, Cadence):
        raise ValueError(
            f"method {method.name!r}: cadence must be a sparsejax.methods.Cadence (never, always, "
            f"periodic(...), following(schedule)), got {type(method.cadence)!r}"
        )
    return method


def resolve_score(score: Any) -> Callable[..., Any]:
    """A score given by name (``"magnitude"``, ``"random"``, ``"saliency"``) or as a callable
    ``score(params, grads, key) -> pytree`` (e.g. ``scores.gblm_score(act_norms)``)."""
    if isinstance(score, str):
        return scores_lib.get(score)
    if score is scores_lib.gblm:
        raise ValueError(
            "score=scores.gblm needs activation norms: pass scores.gblm_score(act_norms) or "
            "functools.partial(scores.gblm, act_norms=...)"
        )
    if not callable(score):
        raise ValueError(f"score must be a name or a callable (params, grads, key), got {score!r}")
    return score


def score_name(score: Any) -> str:
    """A short name of a score for method names and logs."""
    return score if isinstance(score, str) else getattr(score, "__name__", "custom")


def needs_grads(score: Any) -> bool:
    """Whether a score reads gradients (so a one-shot mask from it waits for step 0)."""
    if isinstance(score, str):
        return score == "saliency"
    fn = getattr(score, "func", score)  # functools.partial
    return fn is not scores_lib.magnitude and fn is not scores_lib.random


def dense_masks(params: Params, prunable: prunable_lib.Predicate) -> Masks:
    """All-true masks: bool arrays on prunable leaves, scalar ``True`` elsewhere."""
    tree = prunable_lib.prunable_tree(params, prunable)
    return jax.tree_util.tree_map(
        lambda p, pr: jnp.ones(p.shape, jnp.bool_) if pr else jnp.bool_(True), params, tree
    )


def restrict_to_active(scores: Any, masks: Masks, prunable_tree: Any) -> Any:
    """Give already-pruned entries the lowest priority (-1 < any score >= 0): no regrowth."""
    return jax.tree_util.tree_map(
        lambda s, m, pr: jnp.where(m, s, -1.0) if pr else s, scores, masks, prunable_tree
    )
