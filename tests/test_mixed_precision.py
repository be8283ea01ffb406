"""Mixed precision end to end: a bfloat16 model keeps float32 params and optimizer state, and
every matmul of its whole train step (forward and backward, every layer kind) takes bfloat16
operands, with float32 accumulation where the op allows. Checked on the jaxpr of
:func:`sparsejax.run.step.make_train_step` (traced, never run)."""

from __future__ import annotations

import collections

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from pallas_kernels.layers import bsr_linear_factory, nm_linear_factory
from sparsejax.models import GPT, GPTConfig, dense_linear, sparse_ift
from sparsejax.models.layers import build_linear
from sparsejax.run import accounting
from sparsejax.run.step import TrainState, make_train_step

pytestmark = pytest.mark.slow  # compiles whole train steps

BF16 = jnp.dtype(jnp.bfloat16)
# A dot whose algorithm preset rounds both operands to bfloat16 computes in bfloat16 whatever
# its operands' dtype: jax.nn.dot_product_attention's XLA path gives its score matmul this
# preset, whose transposes (dq, dk) take the float32 score cotangent (jax#24047).
BF16_ALGORITHMS = ("BF16_BF16_F32",)


def _eqns(jaxpr: jcore.Jaxpr):
    """Every equation of ``jaxpr`` and of its sub-jaxprs (pjit, custom_vjp, scan, remat, cond,
    pallas_call kernel bodies), recursively."""
    yield from jaxpr.eqns
    for sub in jcore.subjaxprs(jaxpr):
        yield from _eqns(sub)


def _float_operands(eqn) -> list:
    return [v.aval.dtype for v in eqn.invars
            if hasattr(v.aval, "dtype") and jnp.issubdtype(v.aval.dtype, jnp.floating)]


def not_bf16(jaxpr: jcore.ClosedJaxpr) -> tuple[collections.Counter, list[str]]:
    """``(counts of matmuls and kernel calls, those with a non-bfloat16 floating operand)``."""
    counts, bad = collections.Counter(), []
    for eqn in _eqns(jaxpr.jaxpr):
        name = eqn.primitive.name
        if name not in ("dot_general", "pallas_call"):
            continue
        counts[name] += 1
        dtypes = _float_operands(eqn)
        if name == "dot_general" and str(eqn.params.get("precision")) in BF16_ALGORITHMS:
            continue
        if any(d != BF16 for d in dtypes):
            bad.append(f"{name}{[str(d) for d in dtypes]} at {eqn.source_info.traceback}")
    return counts, bad


def _step_jaxpr(model: GPT) -> tuple[jcore.ClosedJaxpr, TrainState]:
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    tx = optax.adamw(1e-3)
    step = make_train_step(graphdef, jax.tree_util.tree_structure(params_state), rest, tx,
                           fixed_flops=0.0, dense_flops=0.0, tokens_per_step=32.0, sparse=False,
                           structural=accounting.structural_stats(model, params))
    zero = jnp.zeros((), jnp.float32)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0),
                       zero, zero, zero, jnp.zeros((), jnp.int32))
    tokens = jnp.zeros((2, 16), jnp.int32)
    return jax.make_jaxpr(step, return_shape=True)(state, tokens, tokens)


CFG = dict(n_layer=2, d_model=64, n_head=4, d_ff=128, vocab_size=64, n_ctx=16, dtype="bfloat16")
LINEARS = {
    "dense": dense_linear,
    "bsr": bsr_linear_factory((16, 16), 0.5, backend="interpret"),  # Pallas kernels, traced
    "nm": nm_linear_factory(2, 4, backend="interpret"),
    "ift-parallel": sparse_ift.factory("parallel", 0.5),
    "ift-factorized": sparse_ift.factory("factorized", 0.5),
    "ift-doped": sparse_ift.factory("doped", 0.5),
}


@pytest.mark.parametrize("linear, tie, remat, scan", [
    ("dense", True, "none", False),
    ("dense", False, "dots_saveable", True),  # untied head; remat and scan sub-jaxprs
    ("bsr", True, "none", False),
    ("nm", True, "full", True),
    ("ift-parallel", True, "none", False),
    ("ift-factorized", True, "none", False),
    ("ift-doped", True, "none", False),
])
def test_bf16_train_step_runs_every_matmul_in_bf16(linear, tie, remat, scan):
    cfg = GPTConfig(**CFG, tie_embeddings=tie, remat=remat, scan=scan)
    model = GPT(cfg, rngs=nnx.Rngs(0), linear=LINEARS[linear])
    jaxpr, (new_state, _) = _step_jaxpr(model)
    counts, bad = not_bf16(jaxpr)
    assert not bad, "\n".join(bad)
    assert counts["dot_general"] >= 20  # the check saw the model's matmuls
    if linear in ("bsr", "nm"):
        blocks_traced = 1 if scan else cfg.n_layer  # a scan's jaxpr holds one block
        assert counts["pallas_call"] >= 6 * blocks_traced  # every block linear on the kernel
    # storage and optimizer state stay float32
    floats = {str(a.dtype) for a in jax.tree.leaves((new_state.params, new_state.opt_state))
              if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floats == {"float32"}


def test_the_check_finds_float32_matmuls():
    """Negative control: the previous einsum/softmax attention differentiates its float32
    scores into float32 x bfloat16 matmuls, and the check reports them."""
    model = GPT(GPTConfig(**CFG, attention="reference"), rngs=nnx.Rngs(0))
    _, bad = not_bf16(_step_jaxpr(model)[0])
    assert len(bad) == 2 * CFG["n_layer"] and all("float32" in b for b in bad)


def test_bf16_logits_are_float32_and_near_the_float32_model():
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    f32 = GPT(GPTConfig(**{**CFG, "dtype": "float32"}), rngs=nnx.Rngs(0))
    bf16 = GPT(GPTConfig(**CFG), rngs=nnx.Rngs(0))
    hidden = nnx.jit(lambda m, t: m.hidden_states(t))
    logits, h = hidden(bf16, tokens)
    assert logits.dtype == jnp.float32 and {x.dtype for x in h} == {BF16}
    assert float(jnp.max(jnp.abs(logits - hidden(f32, tokens)[0]))) < 0.05


def test_a_factory_without_dtype_is_refused_for_bf16():
    def plain(in_features, out_features, *, use_bias, rngs):
        return dense_linear(in_features, out_features, use_bias=use_bias, rngs=rngs)

    with pytest.raises(ValueError, match="takes no dtype keyword.*bfloat16"):
        GPT(GPTConfig(**CFG), rngs=nnx.Rngs(0), linear=plain)
    layer = build_linear(plain, 4, 8, use_bias=True, rngs=nnx.Rngs(0), dtype="float32")
    assert layer.kernel.shape == (4, 8)  # float32 needs no keyword
