"""Building blocks of the decoder-only transformer: linear factory, rotary embeddings, blocks.

Every linear layer of a block is built through a *linear factory*
``linear(in_features, out_features, *, use_bias, rngs) -> nnx.Module`` mapping ``(..., in)`` to
``(..., out)``, so that Sparse-IFT layers (Thangarasa et al., 2023) or kernel-backed sparse
layers can replace :func:`dense_linear` without touching the model.

Shape suffixes: B batch, L sequence, D d_model, H heads, Dh head dim, F d_ff.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LinearFactory = Callable[..., nnx.Module]
"""``linear(in_features, out_features, *, use_bias, rngs[, init_scale]) -> nnx.Module``; the
optional ``init_scale`` multiplies the std of freshly drawn weights (GPT-2's residual
projections), see :func:`build_linear`."""

INIT_STD = 0.02  # GPT-2 (Radford et al., 2019) initialisation of weights and embeddings.


def dense_linear(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    init_scale: float = 1.0,
) -> nnx.Linear:
    """The default factory: ``nnx.Linear`` (``kernel`` (in, out), ``bias`` (out,)).

    Kernels are drawn from N(0, (0.02·init_scale)²) and biases start at zero (GPT-2).
    ``dtype`` is the compute dtype (``None`` infers it from inputs and params).
    """
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(INIT_STD * init_scale),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def build_linear(linear: LinearFactory, in_features: int, out_features: int, *, use_bias: bool,
                 rngs: nnx.Rngs, init_scale: float = 1.0) -> nnx.Module:
    """``linear(...)``, passing ``init_scale`` to a factory that takes that keyword.

    The scale is part of the *initialisation*: a factory with an ``init_scale`` keyword draws
    its random weights with it, and one that holds given weights (loaded, exported) ignores
    it. Weights are never multiplied after construction, so a model built from given weights
    computes with exactly those weights; a factory without the keyword is built unscaled.
    """
    if init_scale != 1.0 and _takes_init_scale(linear):
        return linear(in_features, out_features, use_bias=use_bias, rngs=rngs,
                      init_scale=init_scale)
    return linear(in_features, out_features, use_bias=use_bias, rngs=rngs)


def _takes_init_scale(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "init_scale" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def scale_weights_(module: nnx.Module, factor: float) -> None:
    """Multiply, in place, every ``nnx.Param`` of ``module`` with ``ndim >= 2`` by ``factor``.

    Used for GPT-2's residual-projection init (std scaled by 1/sqrt(2·n_layer)); acts on
    whatever weight matrices a factory-built layer holds, biases and masks untouched.
    """
    params = nnx.state(module, nnx.Param)
    scaled = jax.tree.map(lambda w: (w * factor).astype(w.dtype) if w.ndim >= 2 else w, params)
    nnx.update(module, scaled)


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """``(cos_LxDh2, sin_LxDh2)`` of rotary embeddings (Su et al., 2021, RoFormer)."""
    inv_freq_Dh2 = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angle_LxDh2 = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq_Dh2[None, :]
    return jnp.cos(angle_LxDh2), jnp.sin(angle_LxDh2)


def apply_rope(x_BxLxHxDh: jax.Array, cos_LxDh2: jax.Array, sin_LxDh2: jax.Array) -> jax.Array:
    """Rotate the two halves of each head's features by position-dependent angles."""
    half = x_BxLxHxDh.shape[-1] // 2
    x1, x2 = x_BxLxHxDh[..., :half], x_BxLxHxDh[..., half:]
    cos = cos_LxDh2[None, :, None, :].astype(x_BxLxHxDh.dtype)
    sin = sin_LxDh2[None, :, None, :].astype(x_BxLxHxDh.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_attention(q_BxLxHxDh: jax.Array, k_BxLxHxDh: jax.Array, v_BxLxHxDh: jax.Array):
    """Softmax attention with a causal mask; scores and softmax in float32."""
    scale = 1.0 / math.sqrt(q_BxLxHxDh.shape[-1])
    s_BxHxLxL = jnp.einsum(
        "blhd,bmhd->bhlm", q_BxLxHxDh, k_BxLxHxDh, preferred_element_type=jnp.float32
    )
    seq_len = q_BxLxHxDh.shape[1]
    causal_LxL = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    s_BxHxLxL = jnp.where(causal_LxL[None, None], s_BxHxLxL * scale, -jnp.inf)
    p_BxHxLxL = jax.nn.softmax(s_BxHxLxL, axis=-1).astype(v_BxLxHxDh.dtype)
    return jnp.einsum("bhlm,bmhd->blhd", p_BxHxLxL, v_BxLxHxDh)


class Attention(nnx.Module):
    """Causal multi-head self-attention with separate query/key/value projections."""

    def __init__(
        self, d_model: int, n_head: int, *, rope: bool, linear: LinearFactory, rngs: nnx.Rngs,
        out_scale: float = 1.0,
    ):
        self.n_head = n_head
        self.rope = rope
        self.query = linear(d_model, d_model, use_bias=True, rngs=rngs)
        self.key = linear(d_model, d_model, use_bias=True, rngs=rngs)
        self.value = linear(d_model, d_model, use_bias=True, rngs=rngs)
        self.out = build_linear(linear, d_model, d_model, use_bias=True, rngs=rngs,
                                init_scale=out_scale)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        B, L, D = x_BxLxD.shape
        Dh = D // self.n_head
        q_BxLxHxDh = self.query(x_BxLxD).reshape(B, L, self.n_head, Dh)
        k_BxLxHxDh = self.key(x_BxLxD).reshape(B, L, self.n_head, Dh)
        v_BxLxHxDh = self.value(x_BxLxD).reshape(B, L, self.n_head, Dh)
        if self.rope:
            cos_LxDh2, sin_LxDh2 = rope_tables(L, Dh)
            q_BxLxHxDh = apply_rope(q_BxLxHxDh, cos_LxDh2, sin_LxDh2)
            k_BxLxHxDh = apply_rope(k_BxLxHxDh, cos_LxDh2, sin_LxDh2)
        o_BxLxHxDh = causal_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh)
        return self.out(o_BxLxHxDh.reshape(B, L, D))


class MLP(nnx.Module):
    """Two-layer GELU feed-forward network."""

    def __init__(self, d_model: int, d_ff: int, *, linear: LinearFactory, rngs: nnx.Rngs,
                 out_scale: float = 1.0):
        self.fc_in = linear(d_model, d_ff, use_bias=True, rngs=rngs)
        self.fc_out = build_linear(linear, d_ff, d_model, use_bias=True, rngs=rngs,
                                   init_scale=out_scale)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = jax.nn.gelu(self.fc_in(x_BxLxD))
        return self.fc_out(h_BxLxF)


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_ff: int,
        *,
        rope: bool,
        out_scale: float,
        linear: LinearFactory,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        norm = dict(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(d_model, **norm)
        self.attn = Attention(d_model, n_head, rope=rope, linear=linear, rngs=rngs,
                              out_scale=out_scale)
        self.mlp_norm = nnx.LayerNorm(d_model, **norm)
        self.mlp = MLP(d_model, d_ff, linear=linear, rngs=rngs, out_scale=out_scale)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD)).astype(x_BxLxD.dtype)
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)).astype(x_BxLxD.dtype)
