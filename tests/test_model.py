"""GPT model: causality through gradients, shapes, prunable leaves, configs, positions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.models import GPT, VARIANTS, GPTConfig, cross_entropy, dense_linear, layers, loss_fn
from sparsejax.prunable import path_str, prunable_tree

SMALL = dict(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=64, n_ctx=16)


def _model(seed: int = 0, **kw) -> GPT:
    return GPT(GPTConfig(**{**SMALL, **kw}), rngs=nnx.Rngs(seed))


def _tokens(shape=(2, 12), vocab=64, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


@nnx.jit
def _fwd(model: GPT, tokens_BxL: jax.Array) -> jax.Array:
    return model(tokens_BxL)


def _grad_by_position(model: GPT, tokens) -> np.ndarray:
    """``G[t, s] = sum |d logits[:, t] / d x[:, s]|`` over batch and features (x: embeddings)."""
    graphdef, state = nnx.split(model)
    w_V = jax.random.normal(jax.random.key(1), (model.cfg.vocab_size,))

    @jax.jit
    def grad_t(state, tokens, t):  # compiled once, called for every output position t
        m = nnx.merge(graphdef, state)

        def out_t(x_BxLxD):
            return jnp.sum(m.logits_from_embeddings(x_BxLxD)[:, t, :] * w_V[None, :])

        g_BxLxD = jax.grad(out_t)(m.embed_tokens(tokens))
        return jnp.abs(g_BxLxD).sum(axis=(0, 2))

    with jax.numpy_rank_promotion("raise"):  # nanodo's habit: no implicit broadcasting
        return np.stack([np.asarray(grad_t(state, tokens, t)) for t in range(tokens.shape[1])])


@pytest.mark.parametrize("pos, n_layer", [("rope", 2), ("learned", 1)])
def test_causal_through_gradients(pos, n_layer):
    g_LxL = _grad_by_position(_model(pos=pos, n_layer=n_layer), _tokens())
    future = np.triu(np.ones_like(g_LxL, dtype=bool), k=1)
    assert np.all(g_LxL[future] == 0.0), f"some position sees the future:\n{g_LxL}"
    assert np.all(g_LxL[~future] > 0.0), f"some position ignores its past:\n{g_LxL}"


def test_causality_check_detects_a_leak(monkeypatch):
    """Negative control: with the causal mask removed, the same check finds future gradients."""

    def leaky(q, k, v, implementation=None):
        del implementation
        p = jax.nn.softmax(jnp.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1]), -1)
        return jnp.einsum("bhlm,bmhd->blhd", p, v)

    monkeypatch.setattr(layers, "causal_attention", leaky)
    g_LxL = _grad_by_position(_model(n_layer=1), _tokens())
    assert np.all(g_LxL[np.triu(np.ones_like(g_LxL, dtype=bool), k=1)] > 0.0)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_shapes_and_prunable_leaves(pos, tie):
    cfg = GPTConfig(**{**SMALL, "pos": pos, "tie_embeddings": tie})
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))  # shapes only, no compute
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, _tokens((3, 7)))
    assert logits.shape == (3, 7, 64) and logits.dtype == jnp.float32
    params = nnx.state(model, nnx.Param)
    flags = jax.tree_util.tree_flatten_with_path(prunable_tree(params))[0]
    got = {path_str(p).removesuffix("/value") for p, f in flags if f}
    want = {
        f"blocks/{i}/{name}/kernel"
        for i in range(2)
        for name in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc_in", "mlp/fc_out")
    }
    assert got == want
    names = {path_str(p).removesuffix("/value") for p, _ in flags}
    assert ("pos_embed" in names) == (pos == "learned")
    assert ("unembed/kernel" in names) == (not tie)


def test_tied_vs_untied_head():
    tied, untied = _model(tie_embeddings=True), _model(tie_embeddings=False)
    n = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert n(untied) - n(tied) == 64 * 32
    assert untied.unembed.kernel.shape == (32, 64)
    # Same seed, same draws for the body; an untied head holding the transposed embedding
    # must reproduce the tied model, and a different head must change the logits.
    tokens = _tokens()
    untied.unembed.kernel[...] = tied.embed.embedding[...].T
    np.testing.assert_allclose(_fwd(untied, tokens), _fwd(tied, tokens), rtol=1e-5, atol=1e-6)
    untied.unembed.kernel[...] = 2.0 * untied.unembed.kernel[...]
    np.testing.assert_allclose(_fwd(untied, tokens), 2.0 * _fwd(tied, tokens), rtol=1e-5, atol=1e-6)


def test_rope_relative_positions_and_norm():
    """RoPE: q(m)·k(n) depends only on m - n, and rotations keep norms (float64 check)."""
    dh, L = 8, 10
    cos, sin = layers.rope_tables(L, dh)
    q = np.random.default_rng(0).normal(size=dh)
    k = np.random.default_rng(1).normal(size=dh)
    tile = lambda v: jnp.asarray(np.tile(v, (1, L, 1, 1)), jnp.float32)  # noqa: E731
    rq = np.asarray(layers.apply_rope(tile(q), cos, sin), np.float64)[0, :, 0]
    rk = np.asarray(layers.apply_rope(tile(k), cos, sin), np.float64)[0, :, 0]
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q), rtol=1e-5)
    np.testing.assert_allclose(rq[3] @ rk[1], rq[7] @ rk[5], rtol=1e-4)
    np.testing.assert_allclose(rq[0] @ rk[0], q @ k, rtol=1e-5)
    # Independent reference: pair (i, i + dh/2) rotated by angle m / 10000^(2i/dh).
    m, i = 4, 1
    a = m / 10000 ** (2 * i / dh)
    c, s = math.cos(a), math.sin(a)
    want = (q[i] * c - q[i + 4] * s, q[i + 4] * c + q[i] * s)
    np.testing.assert_allclose((rq[m, i], rq[m, i + 4]), want, rtol=1e-5)


def test_learned_positions_matter_and_length_limit():
    model = _model(pos="learned")
    tokens = jnp.full((2, 12), 3, jnp.int32)
    logits = np.asarray(_fwd(model, tokens))
    assert not np.allclose(logits[0, 2], logits[0, 3])  # same token, same context, new position
    model.pos_embed[...] = jnp.zeros_like(model.pos_embed[...])
    logits = np.asarray(_fwd(model, tokens))  # no position signal: a constant input stays put
    np.testing.assert_allclose(logits[0, 2], logits[0, 3], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="n_ctx"):
        jax.eval_shape(model, _tokens((1, 17)))
    with pytest.raises(ValueError, match="tokens_BxL"):
        jax.eval_shape(model, jnp.zeros((2, 4), jnp.float32))


def test_loss_matches_float64_reference():
    logits = np.random.default_rng(0).normal(size=(2, 5, 7)) * 3
    targets = np.random.default_rng(1).integers(0, 7, size=(2, 5))
    lse = np.log(np.exp(logits).sum(-1))
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    got = jax.jit(cross_entropy)(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    np.testing.assert_allclose(float(got), (lse - picked).mean(), rtol=1e-5)
    model, tokens = _model(), _tokens()
    targets = jnp.roll(tokens, -1, axis=1)
    loss = nnx.jit(loss_fn)(model, tokens, targets)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    assert abs(float(loss) - math.log(64)) < 0.1  # small init: near-uniform predictions
    lg = np.asarray(_fwd(model, tokens), np.float64)
    t = np.asarray(targets)
    ref = np.log(np.exp(lg).sum(-1)) - np.take_along_axis(lg, t[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), ref.mean(), rtol=1e-5)


def test_linear_factory_builds_every_block_linear_and_init_scales():
    calls = []

    def factory(in_features, out_features, *, use_bias, rngs, init_scale=1.0):
        calls.append((in_features, out_features, use_bias))
        return dense_linear(in_features, out_features, use_bias=use_bias, rngs=rngs,
                            init_scale=init_scale)

    model = GPT(GPTConfig(**{**SMALL, "n_layer": 3}), rngs=nnx.Rngs(0), linear=factory)
    assert sorted(calls) == sorted([(32, 32, True)] * 12 + [(32, 64, True), (64, 32, True)] * 3)
    # GPT-2 init: N(0, 0.02²), residual output projections scaled by 1/sqrt(2·n_layer).
    stack = lambda name: np.concatenate(  # noqa: E731
        [np.ravel(getattr(b.mlp, name).kernel[...]) for b in model.blocks]
    )
    np.testing.assert_allclose(stack("fc_in").std(), 0.02, rtol=0.04)
    np.testing.assert_allclose(stack("fc_out").std(), 0.02 / math.sqrt(6), rtol=0.04)
    assert abs(stack("fc_out").mean()) < 0.002


def test_given_weights_are_never_rescaled():
    """A factory holding given weights (no init_scale keyword) gets them as they are."""
    w = np.arange(32 * 32, dtype=np.float32).reshape(32, 32) / 1024

    def given(in_features, out_features, *, use_bias, rngs):
        layer = dense_linear(in_features, out_features, use_bias=use_bias, rngs=rngs)
        if (in_features, out_features) == (32, 32):
            layer.kernel[...] = w
        return layer

    model = GPT(GPTConfig(**SMALL), rngs=nnx.Rngs(0), linear=given)
    for b in model.blocks:
        np.testing.assert_array_equal(np.asarray(b.attn.out.kernel[...]), w)


def test_bfloat16_compute_returns_float32_logits():
    model = _model(dtype="bfloat16")
    assert model.blocks[0].attn.query.kernel.dtype == jnp.float32  # storage stays float32
    logits = _fwd(model, _tokens())
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(_fwd(_model(), _tokens())), atol=0.05)


def test_variants():
    assert GPTConfig.from_variant("tiny") == GPTConfig(2, 64, 4, 256)
    assert GPTConfig.from_variant("s").d_model == VARIANTS["S"][1]
    cfg = GPTConfig.from_variant("3,48,6,96", pos="learned", n_ctx=64)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_ff, cfg.pos, cfg.n_ctx) == (
        3,
        48,
        6,
        96,
        "learned",
        64,
    )
    sizes = [GPTConfig.from_variant(v) for v in VARIANTS]
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):  # "125M" repeats "L" (paper name)
        assert a.d_model <= b.d_model and a.n_layer <= b.n_layer
    with pytest.raises(ValueError, match="tiny.*XS.*S.*M.*L"):
        GPTConfig.from_variant("XXL")
    with pytest.raises(ValueError, match="n_layer,d_model,n_head,d_ff"):
        GPTConfig.from_variant("2,64,4")
    with pytest.raises(ValueError, match="widht"):
        GPTConfig.from_variant("tiny", widht=3)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(d_model=30), "d_model"),  # not divisible by 4 heads
        (dict(n_head=0), "n_head"),
        (dict(n_layer=-1), "n_layer"),
        (dict(d_ff=2.5), "d_ff"),
        (dict(vocab_size=True), "vocab_size"),
        (dict(pos="alibi"), "pos"),
        (dict(d_model=24, n_head=8), "rope"),  # head dim 3 is odd
        (dict(tie_embeddings=1), "tie_embeddings"),
        (dict(dtype="int8"), "dtype"),
        (dict(param_dtype="float16"), "param_dtype"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**SMALL, **kw})


def test_odd_head_dim_ok_with_learned_positions():
    assert GPTConfig(**{**SMALL, "d_model": 24, "n_head": 8, "pos": "learned"}).head_dim == 3
