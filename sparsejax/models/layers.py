"""Building blocks of the decoder-only transformer: linear factory, rotary embeddings, blocks.

Every linear layer of a block is built through a *linear factory*
``linear(in_features, out_features, *, use_bias, rngs[, init_scale][, dtype]) -> nnx.Module``
mapping ``(..., in)`` to ``(..., out)``, so that Sparse-IFT layers (Thangarasa et al., 2023) or
kernel-backed sparse layers can replace :func:`dense_linear` without touching the model.

Mixed precision (docs/design.md, "Models and Sparse-IFT"): weights are stored in their param
dtype (float32) and every layer computes in the model's compute dtype ``dtype`` (bfloat16 on
accelerators), which the model hands its factory; matmuls accumulate in float32
(:func:`matmul`) and return the compute dtype, so activations between layers stay in it.

Shape suffixes: B batch, L sequence, D d_model, H heads, Dh head dim, F d_ff.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sparsejax.models.attention import causal_attention, reference_attention, resolve_attention

__all__ = ["causal_attention", "reference_attention"]  # re-exported: tests patch and call them

LinearFactory = Callable[..., nnx.Module]
"""``linear(in_features, out_features, *, use_bias, rngs[, init_scale][, dtype]) ->
nnx.Module``; the optional ``init_scale`` multiplies the std of freshly drawn weights (GPT-2's
residual projections) and ``dtype`` is the compute dtype, see :func:`build_linear`."""

INIT_STD = 0.02  # GPT-2 (Radford et al., 2019) initialisation of weights and embeddings.
LINEAR_OUT = "linear_out"  # checkpoint_name of every block linear's output (remat policies)
_MATMUL_DIMS = (((1,), (0,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x_MxK: jax.Array, w_KxN: jax.Array, out_dtype: Any, precision: Any) -> jax.Array:
    acc = jnp.promote_types(x_MxK.dtype, jnp.float32)
    return jax.lax.dot_general(x_MxK, w_KxN, _MATMUL_DIMS, precision=precision,
                               preferred_element_type=acc).astype(out_dtype)


def _matmul_fwd(x_MxK, w_KxN, out_dtype, precision):
    return _matmul(x_MxK, w_KxN, out_dtype, precision), (x_MxK, w_KxN)


def _matmul_bwd(out_dtype, precision, res, g_MxN):
    x_MxK, w_KxN = res
    acc = jnp.promote_types(x_MxK.dtype, jnp.float32)
    g_MxN = g_MxN.astype(x_MxK.dtype)  # the backward matmuls take compute-dtype operands too
    dx = jax.lax.dot_general(g_MxN, w_KxN, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=acc).astype(x_MxK.dtype)
    dw = jax.lax.dot_general(x_MxK, g_MxN, (((0,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=acc).astype(w_KxN.dtype)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w_KxN: jax.Array, *, dtype: Any = None, out_dtype: Any = None,
           precision: Any = None) -> jax.Array:
    """``x (..., K) @ w (K, N)`` with both operands cast to ``dtype`` (default: their result
    type), accumulated in float32 (``preferred_element_type``) and returned in ``out_dtype``
    (default ``dtype``). The backward pass casts the cotangent to ``dtype`` too, so its two
    matmuls also take ``dtype`` operands with float32 accumulation (differentiating a plain
    ``dot_general(..., preferred_element_type=float32)`` would feed a float32 cotangent into
    bfloat16 weights: mixed-dtype matmuls that run in float32)."""
    dtype = jnp.result_type(x, w_KxN) if dtype is None else jnp.dtype(dtype)
    out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
    k, n = w_KxN.shape
    y = _matmul(x.reshape(-1, k).astype(dtype), w_KxN.astype(dtype), out_dtype, precision)
    return y.reshape(*x.shape[:-1], n)


def linear_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                       precision: Any = None, preferred_element_type: Any = None,
                       out_sharding: Any = None) -> jax.Array:
    """``nnx.Linear``'s ``dot_general`` as :func:`matmul`: operands in their (promoted) dtype,
    float32 accumulation, the result in that dtype (``preferred_element_type`` if given)."""
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
        raise ValueError(f"linear_dot_general contracts the last axis of x with a 2-D kernel, "
                         f"got {dimension_numbers} for {lhs.shape} x {rhs.shape}")
    if out_sharding is not None:
        raise ValueError("linear_dot_general takes no out_sharding (shardings propagate)")
    return matmul(lhs, rhs, out_dtype=preferred_element_type, precision=precision)


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
    ``dtype`` is the compute dtype (``None`` infers it from inputs and params); the matmul
    accumulates in float32 (:func:`linear_dot_general`).
    """
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(INIT_STD * init_scale),
        bias_init=nnx.initializers.zeros_init(),
        dot_general=linear_dot_general,
        rngs=rngs,
    )


def build_linear(linear: LinearFactory, in_features: int, out_features: int, *, use_bias: bool,
                 rngs: nnx.Rngs, init_scale: float = 1.0, dtype: Any = None) -> nnx.Module:
    """``linear(...)``, passing ``init_scale`` and ``dtype`` to a factory that takes them.

    The scale is part of the *initialisation*: a factory with an ``init_scale`` keyword draws
    its random weights with it, and one that holds given weights (loaded, exported) ignores
    it. Weights are never multiplied after construction, so a model built from given weights
    computes with exactly those weights; a factory without the keyword is built unscaled.
    ``dtype`` is the compute dtype: a factory without that keyword is refused for any compute
    dtype but float32 (its layers would compute in their own, silently wider, dtype).
    """
    kwargs: dict[str, Any] = {}
    if init_scale != 1.0 and _takes(linear, "init_scale"):
        kwargs["init_scale"] = init_scale
    if dtype is not None:
        if _takes(linear, "dtype"):
            kwargs["dtype"] = dtype
        elif jnp.dtype(dtype) != jnp.float32:
            raise ValueError(f"linear factory {getattr(linear, '__name__', linear)!r} takes no "
                             f"dtype keyword, so it cannot compute in {jnp.dtype(dtype).name}")
    return linear(in_features, out_features, use_bias=use_bias, rngs=rngs, **kwargs)


def _takes(fn: Callable[..., Any], keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


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


def _linear_out(layer: nnx.Module, x: jax.Array, dtype: Any) -> jax.Array:
    """``layer(x)`` in the compute dtype, named :data:`LINEAR_OUT` for remat policies."""
    y = layer(x)
    return checkpoint_name(y if dtype is None else y.astype(dtype), LINEAR_OUT)


class Attention(nnx.Module):
    """Causal multi-head self-attention with separate query/key/value projections.

    ``attention`` (``auto | xla | cudnn``, or ``reference``) picks the implementation when the
    model is traced (:func:`sparsejax.models.attention.resolve_attention`)."""

    def __init__(
        self, d_model: int, n_head: int, *, rope: bool, linear: LinearFactory, rngs: nnx.Rngs,
        out_scale: float = 1.0, dtype: Any = None, attention: str = "auto",
    ):
        self.n_head = n_head
        self.rope = rope
        self.dtype = dtype
        self.attention = attention
        lin = functools.partial(build_linear, linear, d_model, d_model, use_bias=True, rngs=rngs,
                                dtype=dtype)
        self.query = lin()
        self.key = lin()
        self.value = lin()
        self.out = lin(init_scale=out_scale)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        B, L, D = x_BxLxD.shape
        Dh = D // self.n_head
        q_BxLxHxDh = _linear_out(self.query, x_BxLxD, self.dtype).reshape(B, L, self.n_head, Dh)
        k_BxLxHxDh = _linear_out(self.key, x_BxLxD, self.dtype).reshape(B, L, self.n_head, Dh)
        v_BxLxHxDh = _linear_out(self.value, x_BxLxD, self.dtype).reshape(B, L, self.n_head, Dh)
        if self.rope:
            cos_LxDh2, sin_LxDh2 = rope_tables(L, Dh)
            q_BxLxHxDh = apply_rope(q_BxLxHxDh, cos_LxDh2, sin_LxDh2)
            k_BxLxHxDh = apply_rope(k_BxLxHxDh, cos_LxDh2, sin_LxDh2)
        impl = resolve_attention(self.attention, dtype=q_BxLxHxDh.dtype, head_dim=Dh)
        o_BxLxHxDh = causal_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, implementation=impl)
        return _linear_out(self.out, o_BxLxHxDh.reshape(B, L, D), self.dtype)


class MLP(nnx.Module):
    """Two-layer GELU feed-forward network."""

    def __init__(self, d_model: int, d_ff: int, *, linear: LinearFactory, rngs: nnx.Rngs,
                 out_scale: float = 1.0, dtype: Any = None):
        self.dtype = dtype
        self.fc_in = build_linear(linear, d_model, d_ff, use_bias=True, rngs=rngs, dtype=dtype)
        self.fc_out = build_linear(linear, d_ff, d_model, use_bias=True, rngs=rngs,
                                   init_scale=out_scale, dtype=dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h_BxLxF = jax.nn.gelu(_linear_out(self.fc_in, x_BxLxD, self.dtype))
        return _linear_out(self.fc_out, h_BxLxF, self.dtype)


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
        attention: str = "auto",
    ):
        norm = dict(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(d_model, **norm)
        self.attn = Attention(d_model, n_head, rope=rope, linear=linear, rngs=rngs,
                              out_scale=out_scale, dtype=dtype, attention=attention)
        self.mlp_norm = nnx.LayerNorm(d_model, **norm)
        self.mlp = MLP(d_model, d_ff, linear=linear, rngs=rngs, out_scale=out_scale, dtype=dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD)).astype(x_BxLxD.dtype)
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)).astype(x_BxLxD.dtype)
