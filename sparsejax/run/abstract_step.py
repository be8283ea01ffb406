"""A run's train step on abstract inputs: what memory planning compiles and lowering checks.

:func:`abstract_step` builds the model without weights (``nnx.eval_shape``), the abstract
:class:`~sparsejax.run.step.TrainState` and batch, and the jitted step
:func:`sparsejax.run.step.make_train_step` exactly as :func:`sparsejax.run.train.run` makes it
(state donated; sharded like training on a mesh). Nothing is allocated on a device, except that
kernel layers (``model.linear=bsr|nm``) choose their static masks on the host and so are built
there (on the CPU device, or the default one where ``JAX_PLATFORMS`` leaves no CPU backend):
their stored values, at most the dense weights' size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.models.gpt import GPT, loss_fn
from sparsejax.run import accounting, build, distributed, evaluation
from sparsejax.run.spec import RunSpec
from sparsejax.run.step import TrainState, flops_coefficients, is_sparse, make_train_step


class AbstractStep(NamedTuple):
    """The run's jitted train step with abstract arguments (:func:`abstract_step`)."""

    train_step: Any  # jitted (state, x_BxL, y_BxL, loss_aux) -> (state, metrics), donated
    state: TrainState  # jax.ShapeDtypeStruct leaves
    batch: jax.ShapeDtypeStruct  # (train.batch_size, train.seq_len) int32, the global batch
    shardings: Any  # the state's shardings on the mesh, or None
    loss: Any  # (params, x, y) -> loss, for the residuals
    n_devices: int


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def _model(spec: RunSpec, bp: build.Blueprint, vocab_size: int) -> GPT:
    """The run's GPT: abstract for dense (and Sparse-IFT) layers; kernel layers pick their
    masks on the host, so those models are built there, on the CPU."""
    cfg = dataclasses.replace(bp.model_cfg, vocab_size=vocab_size)
    make = functools.partial(GPT, cfg, linear=build.linear_factory(spec, bp.wide))
    if spec.model.linear == "dense":
        return nnx.eval_shape(lambda: make(rngs=nnx.Rngs(spec.seed)))
    try:
        host = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: the default device (module docstring)
        host = jax.local_devices()[0]
    with jax.default_device(host):
        return make(rngs=nnx.Rngs(spec.seed))


def abstract_step(spec: RunSpec, vocab_size: int, mesh: jax.sharding.Mesh | None = None
                  ) -> AbstractStep:
    """The train step :func:`sparsejax.run.train.run` would compile for ``spec``, on abstract
    state and batch (no weights); with a ``mesh``, sharded as training shards it."""
    bp = build.blueprint(spec)
    tx, model = bp.tx, _model(spec, bp, vocab_size)
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params_def = jax.tree_util.tree_structure(params_state)
    params = _abstract(nnx.to_pure_dict(params_state))
    # non-trainable state (N:M codes) is a constant of the step, as in training
    rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype)
                        if isinstance(a, jax.ShapeDtypeStruct) else a, rest)
    sparse = is_sparse(tx, params)

    def init(p):
        zero = jnp.zeros((), jnp.float32)
        return TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.PRNGKey(0), zero,
                          zero, zero, jnp.zeros((), jnp.int32))

    state = jax.eval_shape(init, params)
    fixed, dense = flops_coefficients(model, spec.train.seq_len)
    shardings = n = None
    if mesh is not None:
        shardings = (distributed.state_shardings(mesh, state, params),
                     distributed.batch_sharding(mesh))
        n = mesh.size
    t = spec.train
    step = make_train_step(
        graphdef, params_def, rest, tx, fixed_flops=fixed, dense_flops=dense,
        tokens_per_step=float(t.batch_size * t.seq_len), sparse=sparse,
        structural=accounting.structural_stats(model, params), shardings=shardings)

    def loss(p, x, y):
        return loss_fn(evaluation.merge_model(graphdef, params_def, rest, p), x, y)

    batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32)
    return AbstractStep(step, state, batch, None if shardings is None else shardings[0], loss,
                        n or 1)
