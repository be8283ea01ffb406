"""The jitted pieces of training: :class:`TrainState`, the train step, the evaluation steps.

:func:`make_train_step` is a module-level pure function of the split model (graph, params
tree, rest), the optimizer and the FLOP coefficients, jitted once with donated state and,
on a mesh, explicit shardings. The loop around it is :mod:`sparsejax.run.train`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.errors import NoSparsifyState
from sparsejax.models.gpt import GPT, loss_fn
from sparsejax.run import accounting, distributed, evaluation
from sparsejax.state import SparsityStats, find_state, forward_params
from sparsejax.state import sparsity_stats as _sparsity_stats


class TrainState(NamedTuple):
    step: jax.Array  # shape=(), int32: completed steps
    params: Any  # pure nested dict of arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any  # optimizer state (holds the masks for sparse runs)
    rng: jax.Array  # shape=(2,), uint32: base key; step t uses fold_in(rng, t)
    n_avg: jax.Array  # shape=(), float32: mean active params over completed steps
    flops: jax.Array  # shape=(), float32: cumulative training FLOPs (3x forward)
    loss_sum: jax.Array  # shape=(), float32: train-loss sum since the last log
    loss_count: jax.Array  # shape=(), int32: steps in that sum


def flops_coefficients(model: GPT, seq_len: int) -> tuple[float, float]:
    """Per-token training FLOPs = fixed + dense_part * density (docs/design.md,
    "Accounting"), read off the model's layers (Sparse-IFT and kernel-sparse layers counted as
    built)."""
    fixed, maskable = accounting.forward_flops_coefficients(model, seq_len)
    return 3.0 * fixed, 3.0 * maskable


def sparse_state(opt_state: Any):
    """The optimizer's SparsifyState, or None for a dense optimizer."""
    try:
        return find_state(opt_state)
    except NoSparsifyState:
        return None  # any other ValueError: a composition that cannot keep the zeros


def is_sparse(tx: optax.GradientTransformation, params: Any) -> bool:
    """Whether ``tx``'s state holds masks (traced abstractly: nothing is computed)."""
    found: list[bool] = []
    jax.eval_shape(lambda p: found.append(sparse_state(tx.init(p)) is not None), params)
    return found[0]




def make_train_step(graphdef, params_def, rest, tx, *, fixed_flops, dense_flops,
                    tokens_per_step, sparse: bool, structural: SparsityStats, loss=None,
                    shardings: tuple[Any, Any] | None = None):
    """The jitted step ``(state, inputs_BxL, targets_BxL[, loss_aux]) -> (state, metrics)``;
    ``state`` is donated. ``loss(model, x_BxL, y_BxL, loss_aux)`` replaces the cross-entropy
    as the training objective when given (e.g. :func:`sparsejax.run.distill.squarehead_loss`).
    Sparsity, counts and the target come from the optimizer state
    (:func:`sparsejax.sparsity_stats`, the single source of truth); ``structural`` stands in
    when the optimizer holds no masks (dense runs, and layers that are sparse by construction:
    :func:`accounting.structural_stats`). ``shardings``: ``(state, batch)`` shardings
    (:mod:`sparsejax.run.distributed`); the state keeps its sharding across steps, and the step
    traces and runs with their mesh in context (:class:`distributed.OnMesh`)."""

    def loss_of(params, x_BxL, y_BxL, aux):
        model = evaluation.merge_model(graphdef, params_def, rest, params)
        return loss_fn(model, x_BxL, y_BxL) if loss is None else loss(model, x_BxL, y_BxL, aux)

    def step(state: TrainState, x_BxL, y_BxL, aux=None):
        def loss_of_weights(params):  # straight-through forward weights for sparse runs
            return loss_of(forward_params(params, state.opt_state) if sparse else params,
                           x_BxL, y_BxL, aux)

        loss, grads = jax.value_and_grad(loss_of_weights)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stats = _sparsity_stats(opt_state, params) if sparse else structural
        n_active = jnp.asarray(stats.n_active, jnp.float32)
        density = 1.0 - stats.sparsity
        new = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=state.rng,
            n_avg=accounting.n_avg_update(state.n_avg, n_active, state.step.astype(jnp.float32)),
            flops=state.flops + tokens_per_step * (fixed_flops + dense_flops * density),
            loss_sum=state.loss_sum + loss,
            loss_count=state.loss_count + 1,
        )
        return new, {"n_active": n_active, "density": density,
                     "target_sparsity": stats.target_sparsity}

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    state_sh, batch_sh = shardings
    replicated = distributed.replicated(batch_sh.mesh)  # metrics, and loss_aux (a teacher)
    jitted = jax.jit(step, donate_argnums=0,
                     in_shardings=(state_sh, batch_sh, batch_sh, replicated),
                     out_shardings=(state_sh, replicated))
    return distributed.OnMesh(jitted, batch_sh.mesh)  # the kernel layers read the mesh
