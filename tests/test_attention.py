"""Attention: ``jax.nn.dot_product_attention`` (XLA) equals the model's previous einsum/softmax
attention; the implementation is chosen per platform (cuDNN flash attention on CUDA GPUs), a
``cudnn`` request that cannot run is refused, and the cuDNN path lowers for ``cuda`` on the host
(lowering only: no GPU here)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.models import GPT, GPTConfig, attention, loss_fn
from sparsejax.models.attention import causal_attention, reference_attention, resolve_attention


def _qkv(shape, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys]


@pytest.mark.parametrize("shape", [(2, 12, 4, 8), (1, 33, 2, 16), (2, 64, 2, 64)])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_xla_attention_equals_the_previous_einsum_softmax(shape, dtype, tol):
    q, k, v = _qkv(shape, dtype)
    got = jax.jit(causal_attention)(q, k, v)
    want = jax.jit(reference_attention)(q, k, v)
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)
    # float64 ground truth of the causal softmax (independent of both implementations)
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("blhd,bmhd->bhlm", q64, k64) / math.sqrt(shape[-1])
    s = np.where(np.tril(np.ones((shape[1],) * 2, bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want64 = np.einsum("bhlm,bmhd->blhd", p / p.sum(-1, keepdims=True), v64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want64, atol=4 * tol, rtol=4 * tol)


def test_xla_attention_gradients_equal_the_reference():
    q, k, v = _qkv((2, 12, 4, 8), jnp.float32, seed=1)
    w = jax.random.normal(jax.random.key(2), (2, 12, 4, 8))

    def grads(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(causal_attention), grads(reference_attention), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-5)


def _previous_forward(p, tokens, n_layer: int, n_head: int):
    """The tiny GPT's forward as it was before ``dot_product_attention`` and the float32-
    accumulating matmuls: plain einsum linears and the einsum/softmax attention, from the same
    params ``p`` (float32, rotary positions, tied head)."""

    def lin(d, x):
        return jnp.einsum("...i,io->...o", x, d["kernel"]) + d["bias"]

    def norm(d, x):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * d["scale"] + d["bias"]

    x = p["embed"]["embedding"][tokens]
    B, L, D = x.shape
    H = n_head
    cos, sin = _rope_tables(L, D // H)
    for i in range(n_layer):
        b = p["blocks"][i]
        h = norm(b["attn_norm"], x)
        q, k, v = (lin(b["attn"][n], h).reshape(B, L, H, -1) for n in ("query", "key", "value"))
        o = reference_attention(_rope(q, cos, sin), _rope(k, cos, sin), v).reshape(B, L, D)
        x = x + lin(b["attn"]["out"], o)
        h = norm(b["mlp_norm"], x)
        x = x + lin(b["mlp"]["fc_out"], jax.nn.gelu(lin(b["mlp"]["fc_in"], h)))
    return jnp.einsum("bld,vd->blv", norm(p["final_norm"], x), p["embed"]["embedding"])


def _rope_tables(seq_len, head_dim):
    inv = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    ang = np.arange(seq_len)[:, None] * inv[None]
    return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)


def _rope(x, cos, sin):
    h = x.shape[-1] // 2
    c, s = cos[None, :, None], sin[None, :, None]
    return jnp.concatenate([x[..., :h] * c - x[..., h:] * s, x[..., h:] * c + x[..., :h] * s], -1)


@pytest.mark.slow
def test_tiny_gpt_logits_equal_the_previous_forward():
    cfg = GPTConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=64, n_ctx=16)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
    got = nnx.jit(lambda m, t: m(t))(model, tokens)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want = jax.jit(_previous_forward, static_argnums=(2, 3))(params, tokens, 2, 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    ref = GPT(GPTConfig(**{**vars(cfg), "attention": "reference"}), rngs=nnx.Rngs(0))
    y = jnp.roll(tokens, -1, 1)
    np.testing.assert_allclose(float(nnx.jit(loss_fn)(model, tokens, y)),
                               float(nnx.jit(loss_fn)(ref, tokens, y)), rtol=1e-6)


@pytest.mark.parametrize("requested, dtype, head_dim, where, want", [
    ("auto", "bfloat16", 64, "cpu", "xla"),
    ("auto", "bfloat16", 64, "tpu", "xla"),
    ("auto", "bfloat16", 64, "cuda", "cudnn"),
    ("auto", "float16", 128, "cuda", "cudnn"),
    ("auto", "float32", 64, "cuda", "xla"),  # cuDNN flash attention: 16-bit only
    ("auto", "bfloat16", 12, "cuda", "xla"),  # head dim not a multiple of 8
    ("auto", "bfloat16", 64, "rocm", "xla"),
    ("xla", "bfloat16", 64, "cuda", "xla"),
    ("cudnn", "bfloat16", 64, "cuda", "cudnn"),
])
def test_resolve_attention_per_platform(requested, dtype, head_dim, where, want):
    assert resolve_attention(requested, dtype=dtype, head_dim=head_dim, where=where) == want


@pytest.mark.parametrize("dtype, head_dim, where, match", [
    ("bfloat16", 64, "cpu", "NVIDIA GPUs only.*'cpu'"),
    ("bfloat16", 64, "tpu", "NVIDIA GPUs only"),
    ("float32", 64, "cuda", "bfloat16 or float16, not float32"),
    ("bfloat16", 12, "cuda", "multiple of 8"),
])
def test_cudnn_where_it_cannot_run_is_refused(dtype, head_dim, where, match):
    with pytest.raises(ValueError, match=f"model.attention.*{match}"):
        resolve_attention("cudnn", dtype=dtype, head_dim=head_dim, where=where)
    assert resolve_attention("auto", dtype=dtype, head_dim=head_dim, where=where) == "xla"


def test_config_refuses_bad_attention_names_and_unfit_cudnn():
    base = dict(n_layer=1, d_model=128, n_head=2, d_ff=64)
    with pytest.raises(ValueError, match="attention must be one of"):
        GPTConfig(**base, attention="flash")
    with pytest.raises(ValueError, match="attention='cudnn'.*float32"):
        GPTConfig(**base, attention="cudnn")
    with pytest.raises(ValueError, match="attention='cudnn'.*multiple of 8"):
        GPTConfig(**{**base, "n_head": 32}, dtype="bfloat16", attention="cudnn")  # head dim 4
    GPTConfig(**base, dtype="bfloat16", attention="cudnn")  # fits; the device is checked later


@pytest.fixture
def cuda_lowering(monkeypatch):
    """Lowering for ``cuda`` on this host: jax asks the CUDA plugin for cuDNN's version while
    tracing; without the plugin (a CPU-only jaxlib) a recent version is assumed. Nothing runs."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    try:
        fused.check_cudnn_version()
    except RuntimeError:  # "cuDNN is not detected": no CUDA plugin
        monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90800)


def _cuda_text(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_cudnn_attention_lowers_for_cuda_with_its_backward(cuda_lowering):
    q = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(causal_attention(q, k, v, "cudnn").astype(jnp.float32))

    text = _cuda_text(jax.grad(loss, argnums=(0, 1, 2)), q, q, q)
    assert "__cudnn$fmhaSoftmax(" in text and "__cudnn$fmhaSoftmaxBackward(" in text
    assert '\\22is_flash_attention\\22: true' in text and '\\22mask_type\\22: \\22CAUSAL' in text
    assert "stablehlo.dot_general" not in text  # no L×L score matrix outside the fused kernel


def test_auto_picks_cudnn_for_a_bf16_model_traced_for_cuda(cuda_lowering, monkeypatch):
    monkeypatch.setattr(attention, "platform", lambda: "cuda")
    cfg = GPTConfig(n_layer=2, d_model=128, n_head=2, d_ff=128, vocab_size=64, n_ctx=64,
                    dtype="bfloat16", remat="dots_saveable")
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    grad = jax.grad(lambda p, x: loss_fn(nnx.merge(graphdef, p, rest), x, x))
    text = _cuda_text(grad, params, tokens)
    assert text.count("__cudnn$fmhaSoftmax(") >= 2  # one per block (and its recompute)
    assert text.count("__cudnn$fmhaSoftmaxBackward(") == 2
