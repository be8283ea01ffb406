"""Part of the 8-device child of tests/test_scale_out.py (``tests/_scale_out_child.py mesh``):
the sparse kernels under a mesh, and a long queue of sharded launches (issue 22).

:func:`kernel_hlo` compiles a BSR model's train step on the (2, 4) and (8, 1) meshes and lists
the kernels' custom calls and the all-gathers; :func:`kernel_grads` compares a BSR and an N:M
layer's gradients on the mesh with one device's; :func:`eval_queue` pushes a long queue of
launches through ``evaluation.evaluate``.
"""

from __future__ import annotations

import functools
import re

from _scale_out_child import _in_threads, config

KERNEL_BATCH = 16  # x seq_len 32 = 512 rows, 64 per device
_CALL = re.compile(r"= f32\[([\d,]+)\]\S* custom-call\(.*custom_call_target=\"(sparsejax_bsr_\w+)\""
                   r".*operand_layout_constraints=\{f32\[(\d+),")
_GATHER = re.compile(r"=(.*?) all-gather(?:-start)?\(")  # its result: one shape or a tuple
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _kernel_calls(text: str) -> dict:
    """The BSR kernels' custom calls in a compiled HLO text, as ``[target, result shape, rows
    of the first operand]`` (``x`` or ``dY``), and the shapes its all-gathers return."""
    calls = [m for m in map(_CALL.search, text.splitlines()) if m]
    return {"calls": [[m[2], _dims(m[1]), int(m[3])] for m in calls],
            "gathers": [_dims(shape) for result in _GATHER.findall(text)
                        for shape in _SHAPE.findall(result)]}


def _abstract_step(spec, exp, mesh):
    """The train step of ``exp`` on ``mesh`` and abstract sharded arguments to lower it with
    (nothing initialised or run)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparsejax.run import accounting, distributed, step, train

    graphdef, params_state, rest = nnx.split(exp.model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    abstract = jax.eval_shape(functools.partial(train._init_state, exp.tx, False, 0), params)
    shardings = distributed.state_shardings(mesh, abstract, params)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         abstract, shardings)
    batch_sh = distributed.batch_sharding(mesh)
    train_step = step.make_train_step(
        graphdef, jax.tree_util.tree_structure(params_state), rest, exp.tx, fixed_flops=0.0,
        dense_flops=0.0, tokens_per_step=1.0, sparse=False,
        structural=accounting.structural_stats(exp.model, params), shardings=(shardings, batch_sh))
    batch = jax.ShapeDtypeStruct((KERNEL_BATCH, spec.train.seq_len), jnp.int32, sharding=batch_sh)
    return train_step, (state, batch, batch, None)


def kernel_hlo(out: dict) -> None:
    """Compile the train step of a BSR model (on this CPU the native kernels' FFI custom calls,
    which XLA cannot partition) on the (2, 4) and (8, 1) meshes, and once more on (2, 4)
    without the mesh in context (the kernels' batch split off): the control that must show the
    whole batch on every device."""
    from flax import nnx

    from pallas_kernels.cpu import native
    from pallas_kernels.layers import BSRLinear
    from sparsejax.run import configlib, distributed, experiment

    out["native"] = native.unavailable_reason()
    if out["native"]:
        return
    spec = configlib.validate(config(
        model__size="1,64,4,256", model__linear="bsr", model__block=16, sparsity__method="static",
        sparsity__score="random", sparsity__final=0.5, train__batch_size=KERNEL_BATCH))
    exp = experiment.build(spec)
    out["kernel_rows"] = KERNEL_BATCH * spec.train.seq_len
    out["bsr_layers"] = sum(isinstance(m, BSRLinear) for _, m in nnx.iter_graph(exp.model))
    lowered = {}
    for shape, in_context in (((2, 4), True), ((8, 1), True), ((2, 4), False)):
        mesh = distributed.make_mesh(distributed.MeshShape(*shape))
        train_step, args = _abstract_step(spec, exp, mesh)
        lower = train_step.lower if in_context else train_step.jitted.lower
        lowered["x".join(map(str, shape)) + ("" if in_context else "_no_mesh")] = lower(*args)
    texts = _in_threads(*[lambda lo=lo: lo.compile().as_text() for lo in lowered.values()])
    for name, text in zip(lowered, texts, strict=True):
        out[f"kernel_{name}"] = _kernel_calls(text)


def kernel_grads(out: dict) -> None:
    """Loss and gradients (weights and ``x``) of a BSR and an N:M layer on the (2, 4) mesh, the
    kernels split over the batch, against one device: ``out["kernel_grad_diff"]``, the largest
    difference relative to its leaf's largest entry."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pallas_kernels.layers import bsr_linear_factory, nm_linear_factory
    from sparsejax.run import distributed

    mesh = distributed.make_mesh(distributed.MeshShape(2, 4))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 64))
    out["kernel_grad_diff"] = {}
    for name, factory in (("bsr", bsr_linear_factory((16, 16), 0.5)),
                          ("nm", nm_linear_factory(2, 4))):
        graphdef, params, rest = nnx.split(factory(64, 128, use_bias=True, rngs=nnx.Rngs(0)),
                                           nnx.Param, ...)

        def loss(params, x, graphdef=graphdef, rest=rest):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, params, rest)(x)))

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        want = grad(params, x)
        sharded = jax.device_put(params, distributed.state_shardings(mesh, params, params))
        got = distributed.OnMesh(grad, mesh)(
            sharded, jax.device_put(x, NamedSharding(mesh, P(distributed.BATCH))))
        out["kernel_grad_diff"][name] = max(  # relative to each leaf's largest entry
            float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-30))
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True))


EVAL_BATCHES = 96  # well past the 32 computations XLA:CPU queues per device


def eval_queue(out: dict, repeats: int = 2) -> None:
    """:func:`sparsejax.run.evaluation.evaluate` of the tiny model's sharded loss program on the
    (2, 4) mesh over ``EVAL_BATCHES`` batches, ``repeats`` times. The batch is put on the
    devices once (the host set's batches are ignored), so the host dispatches launches as fast
    as XLA takes them: dispatched all at once (evaluate before the fix) such a queue aborted
    the process, as the final eval's 240 batches did in 4 of 4 runs of issue 22's command."""
    import jax
    from flax import nnx

    from sparsejax.models.gpt import cross_entropy
    from sparsejax.run import configlib, distributed, evaluation, experiment

    spec = configlib.validate(config())
    exp = experiment.build(spec)
    mesh = distributed.make_mesh(distributed.MeshShape(2, 4))
    graphdef, params, rest = nnx.split(exp.model, nnx.Param, ...)
    params_def = jax.tree_util.tree_structure(params)
    params = nnx.to_pure_dict(params)
    params = jax.device_put(params, distributed.state_shardings(mesh, params, params))
    eval_set = evaluation.eval_set(exp.corpus.val, batch_size=spec.eval.batch_size,
                                   seq_len=spec.train.seq_len, n_batches=EVAL_BATCHES, seed=0)
    batch_sh = distributed.batch_sharding(mesh)
    x, y = (distributed.put(a[0], batch_sh) for a in (eval_set.xs, eval_set.ys))

    def losses(params, x_BxL, y_BxL):
        logits = evaluation.merge_model(graphdef, params_def, rest, params)(x_BxL)
        return jax.vmap(lambda lg, t: cross_entropy(lg[None], t[None]))(logits, y_BxL)

    step = distributed.OnMesh(jax.jit(losses, out_shardings=distributed.replicated(mesh)), mesh)
    out["eval_queue"] = [
        evaluation.evaluate(lambda p, _x, _y: step(p, x, y), params, eval_set).n_sequences
        for _ in range(repeats)]
