"""Parameter and FLOP accounting (docs/design.md, "Accounting").

* :func:`count_params`: total, prunable and active (unpruned) parameter counts.
* :func:`flops_per_token`: forward FLOPs per token of a GPT at weight sparsity ``s``,
  ``C(s) = 2L(4d² + 2d·ff)(1 − s) + 4L·n_ctx·d + 2d·V`` (Kaplan et al., 2020, Table 1, with
  the weight matmuls scaled by density as in SPDF, Thangarasa et al., 2023): sparse weight
  matmuls scale with density, attention scores and the LM head stay dense, the embedding
  lookup is free. Training costs three forwards (:func:`train_flops_per_token`).
* :func:`forward_flops_coefficients` / :func:`model_forward_flops`: the same count read off a
  built model's layers, so that transformed layers (Sparse-IFT, Thangarasa et al., 2023:
  parallel branches, factorized ``U V``, Doped's dense low-rank path, a widened model) and
  block-sparse kernel layers are counted as they are: ``2 ×`` each matmul weight, masked
  ones scaled by density, dense ones (Doped's ``lowrank``) not.
* ``N_avg`` (Jin et al., 2025, "The Journey Matters"): the mean over training steps of the
  active parameter count, :func:`n_avg_update` (running) and :func:`n_avg_of` (batch).

Which parameters N counts is the caller's choice through :func:`count_params`: by default
every parameter (``total − pruned``); ``exclude_embeddings=True`` drops the embedding tables
(token and position embeddings, an untied ``unembed`` head: whole path components, see
:func:`sparsejax.prunable.is_embedding`), the non-embedding N of Kaplan et al. (2020). Use the
same convention for every run of a fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.paths import path_str
from sparsejax.prunable import Predicate, default_prunable, is_embedding, resolve
from sparsejax.state import SparsityStats


class ParamCounts(NamedTuple):
    total: int  # every counted entry
    prunable: int  # entries in leaves selected by the prunable predicate
    active: Any  # total − pruned entries; a Python int, or a traced int32 under jit


def count_params(
    params: Any,
    masks: Any = None,
    *,
    prunable: Predicate | None = None,
    exclude_embeddings: bool = False,
) -> ParamCounts:
    """Count parameters of a pytree; ``masks`` (same structure, bool leaves or scalar
    ``True``) marks pruned entries with ``False``. Works on host arrays and under ``jit``
    (``active`` is then a traced scalar)."""
    pred = resolve(prunable)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if masks is None:
        mask_leaves = [True] * len(leaves)
    else:
        mask_leaves = jax.tree.leaves(masks)
        if len(mask_leaves) != len(leaves):
            raise ValueError(
                f"masks must have the structure of params: {len(mask_leaves)} mask leaves vs "
                f"{len(leaves)} param leaves"
            )
    total = prunable_n = 0
    pruned = []
    for (path, leaf), mask in zip(leaves, mask_leaves, strict=True):
        if exclude_embeddings and is_embedding(path):
            continue
        size = int(np.prod(np.shape(leaf), dtype=np.int64))
        total += size
        prunable_n += size if pred(path, leaf) else 0
        if mask is not True:
            if np.shape(mask) not in ((), np.shape(leaf)):
                raise ValueError(
                    f"masks: leaf {path_str(path)!r} has mask shape {np.shape(mask)}, expected "
                    f"() or {np.shape(leaf)}"
                )
            n_kept = jax.numpy.sum(jax.numpy.asarray(mask, bool), dtype=jax.numpy.int32)
            pruned.append(size - n_kept * (size if np.ndim(mask) == 0 else 1))
    n_pruned: Any = sum(pruned)
    if not isinstance(n_pruned, jax.core.Tracer):
        n_pruned = int(n_pruned)
    return ParamCounts(total, prunable_n, total - n_pruned)


def structural_stats(model: Any, params: Any) -> Any:
    """:class:`sparsejax.SparsityStats` of a model trained without masks: dense, or with
    layers that are sparse by construction (``pallas_kernels.layers.BSRLinear``/``NMLinear``:
    any module with ``sparse_kernel()`` and a ``values`` Param). Their dense-equivalent size
    counts as prunable and their stored values as active, so N and the FLOP count of a
    kernel-sparse run follow its real layers, not a config value."""
    n_stored = sum(int(np.prod(np.shape(x), dtype=np.int64))
                   for x in jax.tree_util.tree_leaves(params))
    dense = stored = 0
    for _, module in nnx.iter_graph(model):
        if hasattr(module, "sparse_kernel") and hasattr(module, "values"):
            dense += int(np.prod(module.sparse_kernel().shape, dtype=np.int64))
            stored += int(np.prod(np.shape(module.values[...]), dtype=np.int64))
    sparsity = 1.0 - stored / dense if dense else 0.0
    return SparsityStats(
        target_sparsity=jnp.float32(sparsity),
        sparsity=jnp.float32(sparsity),
        n_params=n_stored + dense - stored,
        n_prunable=dense,
        n_active=jnp.int32(n_stored),
    )


def _check_dims(**dims: Any) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, int | float | np.floating) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")


def flops_per_token(
    n_layer: int, d_model: int, d_ff: int, n_ctx: int, vocab: int, sparsity: float = 0.0
) -> float:
    """Forward FLOPs per token: ``2L(4d² + 2d·ff)(1 − s) + 4L·n_ctx·d + 2d·V``."""
    _check_dims(n_layer=n_layer, d_model=d_model, d_ff=d_ff, n_ctx=n_ctx, vocab=vocab)
    _check_sparsity(sparsity)
    L, d, ff = float(n_layer), float(d_model), float(d_ff)
    weights = 2.0 * L * (4.0 * d * d + 2.0 * d * ff) * (1.0 - sparsity)
    return weights + 4.0 * L * n_ctx * d + 2.0 * d * vocab


def train_flops_per_token(
    n_layer: int, d_model: int, d_ff: int, n_ctx: int, vocab: int, sparsity: float = 0.0
) -> float:
    """Training FLOPs per token: forward + backward = 3 × :func:`flops_per_token`."""
    return 3.0 * flops_per_token(n_layer, d_model, d_ff, n_ctx, vocab, sparsity)


def model_flops_per_token(
    cfg: Any, sparsity: float = 0.0, *, n_ctx: int | None = None, train: bool = False
) -> float:
    """:func:`flops_per_token` (or the training value) of a ``GPTConfig``; ``n_ctx``
    overrides ``cfg.n_ctx`` (the attention span actually used, e.g. the training seq_len)."""
    f = train_flops_per_token if train else flops_per_token
    return f(
        cfg.n_layer,
        cfg.d_model,
        cfg.d_ff,
        cfg.n_ctx if n_ctx is None else n_ctx,
        cfg.vocab_size,
        sparsity,
    )


def block_matmul_weights(model: Any) -> tuple[int, int]:
    """``(maskable, dense)``: matmul weight entries in ``model.blocks`` (attention and MLP
    linears, whatever the factory built). *Maskable* entries are those of leaves the default
    prunable predicate selects (the kernels of ``nnx.Linear`` and of Sparse-IFT's sparse parts)
    plus the dense-equivalent size of kernel-sparse layers (any module with
    ``sparse_kernel()`` and a ``values`` Param: ``BSRLinear``, ``NMLinear``); *dense* ones are
    the other weight matrices (``ndim >= 2``), e.g. Sparse Doped's ``lowrank`` path."""
    maskable = dense = 0
    kernel_layers = []
    for path, node in nnx.iter_graph(model.blocks):
        if hasattr(node, "sparse_kernel") and hasattr(node, "values"):
            maskable += int(np.prod(node.sparse_kernel().shape, dtype=np.int64))
            kernel_layers.append("/".join(map(str, path)) + "/")
    params = nnx.to_pure_dict(nnx.state(model.blocks, nnx.Param))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        if np.ndim(leaf) < 2 or any(name.startswith(p) for p in kernel_layers):
            continue
        size = int(np.prod(np.shape(leaf), dtype=np.int64))
        if default_prunable(path, leaf):
            maskable += size
        else:
            dense += size
    return maskable, dense


def forward_flops_coefficients(model: Any, n_ctx: int) -> tuple[float, float]:
    """``(fixed, maskable)`` with forward FLOPs per token ``= fixed + maskable · density`` for a
    built GPT (:func:`block_matmul_weights`): ``maskable = 2 · (maskable weights)``, ``fixed =
    2 · (dense block weights) + 4L·n_ctx·d + 2d·V`` (attention scores and LM head dense, as in
    :func:`flops_per_token`, which this equals for a plain GPT)."""
    _check_dims(n_ctx=n_ctx)
    c = model.cfg
    maskable, dense = block_matmul_weights(model)
    fixed = 2.0 * dense + 4.0 * c.n_layer * n_ctx * c.d_model + 2.0 * c.d_model * c.vocab_size
    return fixed, 2.0 * maskable


def model_forward_flops(model: Any, n_ctx: int, density: float = 1.0) -> float:
    """Whole-model forward FLOPs per token of a built GPT at ``density`` of its maskable
    weights (:func:`forward_flops_coefficients`); training costs three times this."""
    if not isinstance(density, int | float | np.floating) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    fixed, maskable = forward_flops_coefficients(model, n_ctx)
    return fixed + maskable * density


def n_avg_update(n_avg_prev: float, n_active: float, step: int) -> float:
    """Running mean of active parameters after ``step + 1`` steps (``step`` is 0-based):
    ``n_avg_prev + (n_active − n_avg_prev) / (step + 1)``; ``n_avg_prev`` is ignored at step 0.
    Jittable when ``step`` is traced."""
    if isinstance(step, int | np.integer) and step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    return n_avg_prev + (n_active - n_avg_prev) / (step + 1)


def n_avg_of(n_active_per_step: Sequence[float]) -> float:
    """``N_avg = (1/T) Σ_t N_t`` over the active counts of every training step."""
    values = [float(v) for v in n_active_per_step]
    if not values:
        raise ValueError("n_active_per_step must hold at least one step")
    return math.fsum(values) / len(values)
