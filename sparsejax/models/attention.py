"""Causal self-attention and the choice of its implementation per platform.

:func:`causal_attention` runs ``jax.nn.dot_product_attention(q, k, v, is_causal=True,
implementation=...)`` (layout ``BTNH``: batch, sequence, heads, head dim; scale
``1/sqrt(head_dim)``):

* ``"xla"``: scores and softmax in float32, the probabilities cast to the value dtype; XLA keeps
  the ``B×H×L×L`` probabilities for the backward pass.
* ``"cudnn"``: cuDNN's fused flash attention (Dao et al. 2022, "FlashAttention"; Dao 2023,
  "FlashAttention-2"): the causal part only, no ``L×L`` matrix in memory, on NVIDIA GPUs in
  bfloat16/float16 with a head dim that is a multiple of 8 and at most 128 (256 from Hopper on;
  ``jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention`` of jax 0.10).
* ``"reference"``: the einsum/softmax this model used before (:func:`reference_attention`), for
  tests.

:func:`resolve_attention` maps the model's ``attention`` setting (``auto | xla | cudnn``) to one
of those for the platform the model is traced on: ``auto`` takes cuDNN where it runs and XLA
elsewhere; ``cudnn`` where it cannot run is an error naming the reason, never a silent
fallback.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.extend.backend
import jax.numpy as jnp

from sparsejax.models.options import ATTENTION

IMPLEMENTATIONS: tuple[str, ...] = ("xla", "cudnn", "reference")
CUDNN_DTYPES: tuple[str, ...] = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 256  # Hopper and later; 128 before (compute capability < 9.0)


def reference_attention(q_BxLxHxDh: jax.Array, k_BxLxHxDh: jax.Array,
                        v_BxLxHxDh: jax.Array) -> jax.Array:
    """Softmax attention with a causal mask, scores and softmax in float32 (the model's
    implementation before ``jax.nn.dot_product_attention``; builds the ``L×L`` matrix)."""
    scale = 1.0 / math.sqrt(q_BxLxHxDh.shape[-1])
    s_BxHxLxL = jnp.einsum(
        "blhd,bmhd->bhlm", q_BxLxHxDh, k_BxLxHxDh, preferred_element_type=jnp.float32
    )
    seq_len = q_BxLxHxDh.shape[1]
    causal_LxL = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    s_BxHxLxL = jnp.where(causal_LxL[None, None], s_BxHxLxL * scale, -jnp.inf)
    p_BxHxLxL = jax.nn.softmax(s_BxHxLxL, axis=-1).astype(v_BxLxHxDh.dtype)
    return jnp.einsum("bhlm,bmhd->blhd", p_BxHxLxL, v_BxLxHxDh)


def causal_attention(q_BxLxHxDh: jax.Array, k_BxLxHxDh: jax.Array, v_BxLxHxDh: jax.Array,
                     implementation: str = "xla") -> jax.Array:
    """Causal softmax attention ``BxLxHxDh -> BxLxHxDh`` by ``implementation`` (one of
    :data:`IMPLEMENTATIONS`; ``"cudnn"`` needs a CUDA build of jaxlib to trace)."""
    if implementation == "reference":
        return reference_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh)
    if implementation not in ("xla", "cudnn"):
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, is_causal=True,
                                        implementation=implementation)


def platform() -> str:
    """The default backend as ``"cuda"``, ``"rocm"``, ``"tpu"`` or ``"cpu"`` (a GPU backend
    told apart by its platform version, as jax's cuDNN checks do)."""
    name = jax.default_backend()
    if name != "gpu":
        return name
    version = jax.extend.backend.get_backend().platform_version.lower()
    return "cuda" if "cuda" in version else ("rocm" if "rocm" in version else "gpu")


def _cuda_max_head_dim() -> int:
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    major = int(str(capability).split(".")[0] or 0)
    return CUDNN_MAX_HEAD_DIM if major >= 9 else 128


def cudnn_unfit(dtype: Any, head_dim: int, where: str | None = None) -> str | None:
    """Why cuDNN flash attention cannot run ``dtype`` with ``head_dim`` on ``where`` (a
    :func:`platform` name; ``None``: only what needs no device, the dtype and the head dim up
    to :data:`CUDNN_MAX_HEAD_DIM`); ``None`` when it can."""
    name = jnp.dtype(dtype).name
    if name not in CUDNN_DTYPES:
        return f"cuDNN flash attention computes in {' or '.join(CUDNN_DTYPES)}, not {name}"
    limit = CUDNN_MAX_HEAD_DIM if where != "cuda" else _cuda_max_head_dim()
    if head_dim % 8 or head_dim > limit:
        return (f"cuDNN flash attention needs a head dim that is a multiple of 8 and <= "
                f"{limit}, got {head_dim}")
    if where is not None and where != "cuda":
        return f"cuDNN runs on NVIDIA GPUs only; this process's default backend is {where!r}"
    return None


def resolve_attention(requested: str, *, dtype: Any, head_dim: int,
                      where: str | None = None) -> str:
    """The implementation the setting ``requested`` (:data:`ATTENTION`, or ``"reference"``)
    runs on platform ``where`` (default: :func:`platform`): ``auto`` is ``cudnn`` where
    :func:`cudnn_unfit` finds no reason against it and ``xla`` elsewhere; ``cudnn`` that cannot
    run raises ``ValueError`` naming the reason."""
    if requested not in ATTENTION + ("reference",):
        raise ValueError(f"attention must be one of {ATTENTION}, got {requested!r}")
    if requested in ("xla", "reference"):
        return requested
    reason = cudnn_unfit(dtype, head_dim, platform() if where is None else where)
    if requested == "cudnn" and reason:
        raise ValueError(f"attention='cudnn' (model.attention) cannot run here: {reason}; use "
                         "'auto' (cuDNN where it runs, XLA elsewhere) or 'xla'")
    return "xla" if reason else "cudnn"
