"""Decoder-only transformer language model (GPT-2, Radford et al., 2019) in Flax NNX.

One class serves every size: :meth:`GPTConfig.from_variant` decodes a name of
:data:`VARIANTS` (``"tiny"``, ``"S"``, ``"L"``, ..., the paper sizes ``"125M"`` to ``"1.3B"``)
or an explicit ``"n_layer,d_model,n_head,d_ff"`` string. Pre-norm
blocks, causal attention, GELU MLP, rotary (RoFormer, Su et al., 2021) or learned positions,
optionally tied input/output embeddings. Prunable leaves under the default predicate are
exactly the attention (query, key, value, out) and MLP (fc_in, fc_out) kernels.

Accelerator settings (docs/design.md, "Models and Sparse-IFT"): ``dtype`` is the compute dtype
(weights stay in ``param_dtype``; logits and loss are float32), ``attention`` the attention
implementation (:mod:`sparsejax.models.attention`), ``remat`` and ``scan`` how the blocks run
(:mod:`sparsejax.models.stack`); none of them changes the params tree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.models.attention import ATTENTION, cudnn_unfit
from sparsejax.models.layers import (
    INIT_STD,
    Block,
    LinearFactory,
    dense_linear,
    linear_dot_general,
    matmul,
)
from sparsejax.models.stack import REMAT, apply_blocks

# name -> (n_layer, d_model, n_head, d_ff); the only place variant names are decoded.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "nano": (2, 32, 4, 128),  # nano, micro and mini: CPU-scale sweeps (configs/sweeps/)
    "micro": (2, 48, 4, 192),
    "tiny": (2, 64, 4, 256),
    "mini": (3, 96, 4, 384),
    "XS": (4, 128, 4, 512),
    "S": (6, 256, 8, 1024),
    "M": (8, 512, 8, 2048),
    "L": (12, 768, 12, 3072),  # GPT-2 small's body
    # the shapes sparse pre-training papers train (SPDF, Sparse-IFT): GPT-3 Small, Medium,
    # Large, XL (Brown et al. 2020, Table 2.1; XL with 16 heads of 128). Names count a
    # 50257-token vocabulary; on a byte corpus (vocab 256) they hold 85M, 303M, 680M, 1.21B.
    "125M": (12, 768, 12, 3072),
    "350M": (24, 1024, 16, 4096),
    "760M": (24, 1536, 16, 6144),
    "1.3B": (24, 2048, 16, 8192),
}
POSITIONS = ("rope", "learned")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")


def _dtype_name(value: Any, field: str, allowed: tuple[str, ...]) -> str:
    try:
        name = jnp.dtype(value).name
    except TypeError as e:
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}") from e
    if name not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
    return name


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model hyper-parameters (separate from the run's ConfigDict, as in nanodo).

    ``dtype`` is the compute dtype and ``param_dtype`` the storage dtype; both are stored as
    dtype names (``"float32"``, ``"bfloat16"``, ...) so the config is JSON- and hash-friendly.
    ``attention`` (``auto | xla | cudnn``, or ``reference``), ``remat`` (:data:`~sparsejax.
    models.stack.REMAT`) and ``scan`` (bool) change how the model computes, not its params.
    """

    n_layer: int
    d_model: int
    n_head: int
    d_ff: int
    vocab_size: int = 256
    n_ctx: int = 256
    pos: str = "rope"
    tie_embeddings: bool = True
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention: str = "auto"
    remat: str = "none"
    scan: bool = False

    def __post_init__(self):
        for field in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "n_ctx"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{field} must be a positive int, got {v!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if self.pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS}, got {self.pos!r}")
        if self.pos == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"pos='rope' needs an even head dim d_model/n_head, got "
                f"{self.d_model}/{self.n_head} = {self.d_model // self.n_head}"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype, "dtype", COMPUTE_DTYPES))
        object.__setattr__(
            self, "param_dtype", _dtype_name(self.param_dtype, "param_dtype", PARAM_DTYPES)
        )
        if self.attention not in ATTENTION + ("reference",):
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.attention == "cudnn" and (reason := cudnn_unfit(self.dtype, self.head_dim)):
            raise ValueError(f"attention='cudnn': {reason}")
        if self.remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}, got {self.remat!r}")
        if not isinstance(self.scan, bool):
            raise ValueError(f"scan must be a bool, got {self.scan!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> GPTConfig:
        """Decode a variant name (``tiny``, ``XS``, ``S``, ``M``, ``L``; case-insensitive) or
        ``"n_layer,d_model,n_head,d_ff"``; keyword ``overrides`` replace any field."""
        if not isinstance(variant, str):
            raise ValueError(f"variant must be a str, got {variant!r}")
        by_lower = {k.lower(): v for k, v in VARIANTS.items()}
        if variant.strip().lower() in by_lower:
            n_layer, d_model, n_head, d_ff = by_lower[variant.strip().lower()]
        else:
            parts = variant.split(",")
            try:
                n_layer, d_model, n_head, d_ff = (int(p) for p in parts)
            except ValueError:
                raise ValueError(
                    f"variant must be one of {list(VARIANTS)} or 'n_layer,d_model,n_head,d_ff' "
                    f"(four ints), got {variant!r}"
                ) from None
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown GPTConfig override(s) {unknown}; valid: {sorted(fields)}")
        kwargs = dict(n_layer=n_layer, d_model=d_model, n_head=n_head, d_ff=d_ff)
        return cls(**{**kwargs, **overrides})


class GPT(nnx.Module):
    """GPT language model: ``tokens_BxL (int) -> logits_BxLxV (float32)``.

    ``linear`` builds every linear layer of the blocks (see
    :data:`sparsejax.models.layers.LinearFactory`) and is handed the compute dtype ``dtype``
    (:func:`~sparsejax.models.layers.build_linear`); the default :func:`dense_linear` also gets
    ``param_dtype``. Attention and MLP output projections are
    initialised with std scaled by 1/sqrt(2·n_layer) (GPT-2 init) through the factory's
    ``init_scale`` (:func:`~sparsejax.models.layers.build_linear`), so a factory that holds
    given weights gets them unscaled.
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, linear: LinearFactory = dense_linear):
        if not isinstance(cfg, GPTConfig):
            raise ValueError(f"cfg must be a GPTConfig, got {type(cfg)!r}")
        self.cfg = cfg
        if linear is dense_linear:
            linear = functools.partial(dense_linear, param_dtype=cfg.param_dtype)
        init = nnx.initializers.normal(INIT_STD)
        self.embed = nnx.Embed(  # looked up in param_dtype (its gradient's scatter-add too)
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=init,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        if cfg.pos == "learned":
            self.pos_embed = nnx.Param(
                init(rngs.params(), (cfg.n_ctx, cfg.d_model), jnp.dtype(cfg.param_dtype))
            )
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layer)
        self.blocks = nnx.List(
            [
                Block(
                    cfg.d_model,
                    cfg.n_head,
                    cfg.d_ff,
                    rope=cfg.pos == "rope",
                    out_scale=out_scale,
                    linear=linear,
                    dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype,
                    rngs=rngs,
                    attention=cfg.attention,
                )
                for _ in range(cfg.n_layer)
            ]
        )
        self.final_norm = nnx.LayerNorm(
            cfg.d_model, epsilon=1e-5, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        if not cfg.tie_embeddings:  # "embed" in the name keeps it out of the default predicate
            self.unembed = nnx.Linear(
                cfg.d_model,
                cfg.vocab_size,
                use_bias=False,
                kernel_init=init,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                dot_general=linear_dot_general,
                preferred_element_type=jnp.float32,  # float32 logits
                rngs=rngs,
            )

    def embed_tokens(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token (plus learned position) embeddings ``x_BxLxD`` in the compute dtype."""
        if tokens_BxL.ndim != 2 or not jnp.issubdtype(tokens_BxL.dtype, jnp.integer):
            raise ValueError(
                f"tokens_BxL must be a 2-D integer array, got {tokens_BxL.dtype}{tokens_BxL.shape}"
            )
        seq_len = tokens_BxL.shape[1]
        if seq_len > self.cfg.n_ctx:
            raise ValueError(f"sequence length {seq_len} exceeds n_ctx={self.cfg.n_ctx}")
        x_BxLxD = self.embed(tokens_BxL)
        if self.cfg.pos == "learned":
            x_BxLxD = x_BxLxD + self.pos_embed[:seq_len][None].astype(x_BxLxD.dtype)
        return x_BxLxD.astype(self.cfg.dtype)

    def logits_from_embeddings(self, x_BxLxD: jax.Array) -> jax.Array:
        """Run the blocks, final norm and LM head on embeddings; returns float32 logits."""
        return self._forward(x_BxLxD)[0]

    def hidden_states(self, tokens_BxL: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """``(logits_BxLxV, (h_1, ..., h_L))``: the logits and the output ``h_l`` (``BxLxD``,
        the residual stream) of every decoder block, for feature distillation such as
        SquareHead (Kurtic et al. 2023)."""
        return self._forward(self.embed_tokens(tokens_BxL))

    def _forward(self, x_BxLxD: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        cfg = self.cfg
        x_BxLxD, hidden = apply_blocks(list(self.blocks), x_BxLxD.astype(cfg.dtype),
                                       remat=cfg.remat, scan=cfg.scan, dtype=cfg.dtype)
        return self._head(x_BxLxD), hidden

    def _head(self, x_BxLxD: jax.Array) -> jax.Array:
        """Final norm and LM head: compute-dtype operands, float32 accumulation and logits."""
        h_BxLxD = self.final_norm(x_BxLxD)
        if self.cfg.tie_embeddings:
            w_DxV = self.embed.embedding[...].T
            return matmul(h_BxLxD, w_DxV, dtype=self.cfg.dtype, out_dtype=jnp.float32)
        return self.unembed(h_BxLxD).astype(jnp.float32)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        return self.logits_from_embeddings(self.embed_tokens(tokens_BxL))


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32 (natural log)."""
    logits = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits, axis=-1)
    picked_BxL = jnp.take_along_axis(logits, targets_BxL[..., None].astype(jnp.int32), -1)[..., 0]
    return jnp.mean(lse_BxL - picked_BxL)


def loss_fn(model: GPT, tokens_BxL: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Scalar mean cross-entropy of ``model(tokens_BxL)`` against ``targets_BxL``."""
    return cross_entropy(model(tokens_BxL), targets_BxL)
