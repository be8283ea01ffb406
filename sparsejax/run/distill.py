"""SquareHead distillation (Kurtic et al. 2023, "Sparse Finetuning for Inference Acceleration
of Large Language Models").

A sparse student fine-tunes against a dense teacher with three terms::

    loss = h_ce * CE(student, targets)
         + h_kl * T^2 * KL(p_teacher^T || p_student^T)
         + h_sq * sum_l  mean((h_s^l - h_t^l)^2) / (mean((h_t^l)^2) + eps)

``p^T = softmax(logits / T)`` per token (KL averaged over tokens; the ``T^2`` keeps its
gradient scale independent of ``T``, Hinton et al. 2015), and ``h^l`` the output of decoder
block ``l`` (:meth:`sparsejax.models.gpt.GPT.hidden_states`). The feature term is the
paper's SquareHead: each layer's mean squared error normalised by the teacher's mean
squared feature, so every layer weighs the same whatever its scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models.gpt import GPT, cross_entropy

EPS = 1e-6


class SquareHeadWeights(NamedTuple):
    """Weights of the three SquareHead terms and the distillation temperature."""

    h_ce: float = 1.0
    h_kl: float = 1.0
    h_sq: float = 1.0
    temperature: float = 1.0
    eps: float = EPS


class SquareHeadTerms(NamedTuple):
    """The total and its unweighted terms (all float32 scalars)."""

    loss: jax.Array
    ce: jax.Array
    kl: jax.Array  # mean over tokens of KL(p_teacher^T || p_student^T), without T^2
    feature: jax.Array  # sum over layers of the normalised MSE


def check_weights(w: SquareHeadWeights) -> SquareHeadWeights:
    """``w`` if every weight is a finite float >= 0 and the temperature and eps are > 0."""
    for name in ("h_ce", "h_kl", "h_sq", "temperature", "eps"):
        v = getattr(w, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"squarehead: {name} must be a finite float, got {v!r}")
    for name in ("h_ce", "h_kl", "h_sq"):
        if getattr(w, name) < 0:
            raise ValueError(f"squarehead: {name} must be >= 0, got {getattr(w, name)!r}")
    for name in ("temperature", "eps"):
        if getattr(w, name) <= 0:
            raise ValueError(f"squarehead: {name} must be > 0, got {getattr(w, name)!r}")
    return w


def squarehead_terms(
    student_logits_BxLxV: jax.Array,
    student_hidden: Sequence[jax.Array],
    teacher_logits_BxLxV: jax.Array,
    teacher_hidden: Sequence[jax.Array],
    targets_BxL: jax.Array,
    weights: SquareHeadWeights = SquareHeadWeights(),
) -> SquareHeadTerms:
    """The SquareHead loss of a student against a teacher (see the module docstring).

    ``*_hidden``: one ``BxLxD`` array per decoder block, as many for the student as for the
    teacher. The teacher's outputs get no gradient (``stop_gradient``)."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"squarehead: the student has {len(student_hidden)} layers, the "
                         f"teacher {len(teacher_hidden)}; features are matched layer by layer")
    t_logits = jax.lax.stop_gradient(teacher_logits_BxLxV).astype(jnp.float32)
    s_logits = student_logits_BxLxV.astype(jnp.float32)
    ce = cross_entropy(s_logits, targets_BxL)
    temp = weights.temperature
    log_pt = jax.nn.log_softmax(t_logits / temp, axis=-1)
    log_ps = jax.nn.log_softmax(s_logits / temp, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1))
    feature = jnp.float32(0.0)
    for hs, ht in zip(student_hidden, teacher_hidden, strict=True):
        ht = jax.lax.stop_gradient(ht).astype(jnp.float32)
        hs = hs.astype(jnp.float32)
        feature = feature + jnp.mean(jnp.square(hs - ht)) / (jnp.mean(jnp.square(ht))
                                                              + weights.eps)
    loss = weights.h_ce * ce + weights.h_kl * temp**2 * kl + weights.h_sq * feature
    return SquareHeadTerms(loss, ce, kl, feature)


def squarehead_loss(teacher: GPT, weights: SquareHeadWeights
                    ) -> tuple[Callable[[GPT, jax.Array, jax.Array, Any], jax.Array], Any]:
    """``(loss, teacher_state)`` for :func:`sparsejax.run.train.run`'s ``loss``/``loss_aux``:
    ``loss(student, x_BxL, y_BxL, teacher_state)`` runs the teacher (its state passed as an
    argument, not baked into the compiled step as constants) and returns the SquareHead total.
    """
    check_weights(weights)
    graphdef, state = nnx.split(teacher)

    def loss(student: GPT, x_BxL: jax.Array, y_BxL: jax.Array, teacher_state: Any) -> jax.Array:
        t = nnx.merge(graphdef, teacher_state)
        t_logits, t_hidden = t.hidden_states(x_BxL)
        s_logits, s_hidden = student.hidden_states(x_BxL)
        return squarehead_terms(s_logits, s_hidden, t_logits, t_hidden, y_BxL, weights).loss

    return loss, state


def check_teacher(student: GPT, teacher: GPT) -> None:
    """The teacher must share the student's vocabulary, depth and width (features and logits
    are compared entry by entry); ``ValueError`` naming the differing field otherwise."""
    for field in ("vocab_size", "n_layer", "d_model"):
        a, b = getattr(student.cfg, field), getattr(teacher.cfg, field)
        if a != b:
            raise ValueError(f"finetune.teacher: its model has {field}={b}, the student "
                             f"{field}={a}; SquareHead matches them one to one")
