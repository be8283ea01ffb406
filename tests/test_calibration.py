"""Calibration statistics: activation norms against each layer's input computed by hand,
per-sequence gradient norms, and the Wanda score."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax import calibration, scores
from sparsejax.models.gpt import GPT, GPTConfig, loss_fn


@pytest.fixture(scope="module")
def tiny():
    cfg = GPTConfig.from_variant("1,16,2,32", n_ctx=8, vocab_size=32)
    model = GPT(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 32, (3, 8)).astype(np.int32),
                rng.integers(0, 32, (3, 8)).astype(np.int32)) for _ in range(2)]
    return model, batches


def _sumsq(x):
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return np.sum(x * x, axis=0)


def test_activation_norms_equal_each_layers_input_by_hand(tiny):
    model, batches = tiny
    norms = calibration.activation_norms(model, batches)
    blk = model.blocks[0]
    want = {k: 0.0 for k in ("query", "key", "value", "out", "fc_in", "fc_out")}
    for x, _ in batches:  # every layer's input, run independently from the model's parts
        h = model.embed_tokens(jnp.asarray(x))
        a_in = blk.attn_norm(h)
        B, L, D = a_in.shape
        att = blk.attn
        q = att.query(a_in).reshape(B, L, att.n_head, -1)
        k = att.key(a_in).reshape(B, L, att.n_head, -1)
        v = att.value(a_in).reshape(B, L, att.n_head, -1)
        from sparsejax.models.layers import apply_rope, causal_attention, rope_tables

        cos, sin = rope_tables(L, D // att.n_head)
        o = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v).reshape(B, L, D)
        h = h + att.out(o)
        m_in = blk.mlp_norm(h)
        f = jax.nn.gelu(blk.mlp.fc_in(m_in))
        for name, inp in (("query", a_in), ("key", a_in), ("value", a_in), ("out", o),
                          ("fc_in", m_in), ("fc_out", f)):
            want[name] = want[name] + _sumsq(inp)
    got = {**norms["blocks"][0]["attn"], **norms["blocks"][0]["mlp"]}
    for name, w in want.items():
        assert got[name]["bias"] is None
        np.testing.assert_allclose(np.asarray(got[name]["kernel"]), np.sqrt(w), rtol=2e-5,
                                   err_msg=name)
    assert norms["embed"]["embedding"] is None and norms["final_norm"]["scale"] is None
    assert got["fc_out"]["kernel"].shape == (32,)


def test_activation_norms_leave_the_model_unchanged(tiny):
    model, batches = tiny
    before = nnx.to_pure_dict(nnx.state(model))
    calibration.activation_norms(model, batches[:1])
    assert type(model.blocks[0].attn.query) is nnx.Linear
    assert not hasattr(model.blocks[0].attn.query, "act_sumsq")
    after = nnx.to_pure_dict(nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_activation_norms_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="batches is empty"):
        calibration.activation_norms(model, [])
    with pytest.raises(ValueError, match="no layer of type"):
        calibration.activation_norms(model, [np.zeros((1, 8), np.int32)], layer_types=nnx.Conv)


def test_gradient_norms_are_the_l2_norm_of_per_sequence_gradients(tiny):
    model, batches = tiny
    got = calibration.gradient_norms(model, batches, loss_fn)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    # one compiled gradient of a single sequence, called once per sequence (unjitted
    # per-sequence grads dominated this test's time)
    grad_one = jax.jit(jax.grad(lambda st, x, y: loss_fn(nnx.merge(graphdef, st, rest), x, y)))
    total = None
    for x, y in batches:
        for i in range(x.shape[0]):
            g = nnx.to_pure_dict(grad_one(state, x[i:i + 1], y[i:i + 1]))
            sq = jax.tree.map(lambda a: np.square(np.asarray(a, np.float64)), g)
            total = sq if total is None else jax.tree.map(np.add, total, sq)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.sqrt(b), rtol=1e-4, atol=1e-7),
                 got, total)


def test_wanda_score_values_and_gblm_with_the_same_norms():
    w = {"d": {"kernel": jnp.array([[1.0, -2.0], [3.0, 4.0], [-0.5, 0.0]]),
               "bias": jnp.array([1.0, 1.0])}}
    act = {"d": {"kernel": jnp.array([2.0, 0.5, 4.0]), "bias": None}}
    s = calibration.wanda_score(act)(w)
    np.testing.assert_allclose(s["d"]["kernel"], [[2.0, 4.0], [1.5, 2.0], [2.0, 0.0]])
    np.testing.assert_array_equal(s["d"]["bias"], [0.0, 0.0])
    g = jax.tree.map(jnp.ones_like, w)
    gb = scores.gblm_score(act, alpha=0.5)(w, g)
    np.testing.assert_allclose(gb["d"]["kernel"], s["d"]["kernel"] + 0.5 * np.abs(w["d"]["kernel"]))
    with pytest.raises(ValueError, match="act_norms is required"):
        calibration.wanda_score(None)
    with pytest.raises(ValueError, match="needs 3 input-feature norms"):
        calibration.wanda_score({"d": {"kernel": jnp.ones(2), "bias": None}})(w)
