"""Exact, sort-free mask selection: layer-wise top-k, global top-k, N:M and block masks.

Every selector keeps an *exact* number of entries (DESIGN.md, "Selection"): a leaf of ``n``
entries at sparsity ``s`` keeps ``n - round(s * n)`` of them (``round`` is half-to-even on the
float32 product, the same rule numpy applies). Ties are broken deterministically: among equal
scores the lower flat index is kept.

The top-k is found without sorting: the float32 scores are mapped to ``uint32`` keys whose
unsigned order is the float order, the k-th largest key is found by a radix select over
its 16-bit digits (2 histogram passes, scatter-adds into 65,536 bins; same result as DESIGN.md's
32-pass bit bisection), the counts above and at the threshold come from the histograms, and
ties at the threshold are resolved by a cumulative count in flat index order, run only when
some tied entries must be dropped. Cost: a few O(n) passes, against O(n log n) with a large
constant for ``argsort``/``top_k`` on CPU.

Masks are pytrees shaped like params: prunable leaves hold ``bool`` arrays of the leaf's shape,
the others a scalar ``True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_SIGN = np.uint32(0x80000000)


def sortable_key(score: jax.Array) -> jax.Array:
    """Map float32 scores to ``uint32`` keys with the same order (``-0.0 == +0.0``; no NaNs).

    Works on the bit pattern only, so denormals keep their order even where the CPU flushes
    them to zero in float arithmetic.
    """
    bits = jax.lax.bitcast_convert_type(score.astype(jnp.float32), jnp.uint32)
    bits = jnp.where(bits == _SIGN, jnp.uint32(0), bits)  # -0.0 -> +0.0
    negative = (bits & _SIGN) != 0
    return jnp.where(negative, ~bits, bits | _SIGN)


def num_pruned(size: int | jax.Array, sparsity: float | jax.Array) -> jax.Array:
    """``round(sparsity * size)`` in float32, half-to-even, as int32 (traceable)."""
    s = jnp.asarray(sparsity, jnp.float32)
    return jnp.round(s * jnp.float32(size)).astype(jnp.int32)


def num_kept(size: int | jax.Array, sparsity: float | jax.Array) -> jax.Array:
    """``size - round(sparsity * size)``: the exact number of entries a leaf keeps."""
    return jnp.int32(size) - num_pruned(size, sparsity)


_DIGIT_BITS = 16  # two histogram passes of 65,536 bins over the uint32 keys
_BINS = 1 << _DIGIT_BITS


def _count(index: jax.Array, mode: jax.lax.GatherScatterMode) -> jax.Array:
    """Histogram of int32 ``index`` over ``_BINS`` bins by scatter-add (``FILL_OR_DROP``
    drops indices outside ``[0, _BINS)``, negative ones included: no index normalization)."""
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
    )
    return jax.lax.scatter_add(
        jnp.zeros(_BINS, jnp.int32), index.reshape(-1, 1), jnp.ones(index.size, jnp.int32),
        dnums, mode=mode,
    )


def _pick_digit(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Digit ``d`` holding the k-th largest entry of a histogram, #entries above it, #in it."""
    at_least = jnp.cumsum(hist[::-1])[::-1]  # at_least[d] = #(digit >= d)
    d = jnp.sum(at_least >= k, dtype=jnp.int32) - 1
    above = jnp.where(d < _BINS - 1, at_least[jnp.minimum(d + 1, _BINS - 1)], 0)
    return d, above, hist[d]


def _kth_largest_key(
    keys: Sequence[jax.Array], k: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Radix select of the k-th largest key over all ``keys`` (1 <= k <= total).

    Returns ``(thresh, n_above, n_equal)``: the key, and how many keys are greater than and
    equal to it. Two passes over 16-bit digits, most significant first (same result as
    DESIGN.md's 32 passes of bit-wise bisection). Pass 1 histograms the high halves; pass 2
    histograms ``key - (d1 << 16)`` as a scatter index that drops every key outside the chosen
    high half (wrapped or too large), so no masking pass is needed.
    """
    k = jnp.asarray(k, jnp.int32)
    high = [(key >> np.uint32(_DIGIT_BITS)).astype(jnp.int32) for key in keys]  # [0, 2**16)
    hist = sum(_count(h, jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS) for h in high)
    d1, above1, _ = _pick_digit(hist, k)
    base = d1.astype(jnp.uint32) << np.uint32(_DIGIT_BITS)
    # key - base as int32 is in [0, 2**16) exactly for the keys whose high half is d1; every
    # other key (wrapped negative or too large) is dropped by the scatter.
    low = [jax.lax.bitcast_convert_type(key - base, jnp.int32) for key in keys]
    hist = sum(_count(lo, jax.lax.GatherScatterMode.FILL_OR_DROP) for lo in low)
    d2, above2, n_equal = _pick_digit(hist, k - above1)
    return base | d2.astype(jnp.uint32), above1 + above2, n_equal


def _select(keys: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
    """Boolean masks keeping exactly the ``k`` largest keys jointly over ``keys``.

    Ties at the threshold are kept in flat order: array by array, then flat index. The
    cumulative count that orders ties only runs when some tied entries must be dropped.
    """
    k = jnp.asarray(k, jnp.int32)
    thresh, n_above, n_ties = _kth_largest_key(keys, jnp.maximum(k, 1))
    ties_left = k - n_above  # how many entries equal to the threshold we still keep

    def keep_all_ties(keys):
        return [(key >= thresh) & (k > 0) for key in keys]

    def keep_first_ties(keys):
        out, offset = [], jnp.int32(0)
        for key in keys:
            tie = key == thresh
            rank = jnp.cumsum(tie.ravel(), dtype=jnp.int32).reshape(tie.shape) + offset
            out.append(((key > thresh) | (tie & (rank <= ties_left))) & (k > 0))
            offset = rank.ravel()[-1] if tie.size else offset
        return out

    return jax.lax.cond(ties_left >= n_ties, keep_all_ties, keep_first_ties, list(keys))


def topk_mask(score: jax.Array, k: int | jax.Array) -> jax.Array:
    """Keep exactly the ``k`` highest scores of one array (ties: lower flat index kept).

    ``k`` may be traced. Reference: the first ``k`` entries of a stable descending argsort.
    """
    return _select([sortable_key(score)], k)[0]


def sparsity_mask(score: jax.Array, sparsity: float | jax.Array) -> jax.Array:
    """Layer-wise exact mask of one array at ``sparsity`` (keeps ``n - round(s n)``)."""
    return topk_mask(score, num_kept(score.size, sparsity))


def _leaves(tree: Any) -> tuple[list[Any], Any]:
    return jax.tree_util.tree_flatten(tree)


def layerwise(scores: Any, sparsities: Any, prunable: Any) -> Any:
    """Per-leaf exact masks: every prunable leaf keeps ``n_l - round(s_l n_l)`` entries.

    Args:
      scores: pytree of float scores shaped like params.
      sparsities: pytree of per-leaf sparsities (floats or traced scalars), same structure.
      prunable: pytree of Python bools, same structure.
    """
    s_leaves, treedef = _leaves(scores)
    sp_leaves = treedef.flatten_up_to(sparsities)
    pr_leaves = treedef.flatten_up_to(prunable)
    out = [
        sparsity_mask(sc, sp) if pr else jnp.bool_(True)
        for sc, sp, pr in zip(s_leaves, sp_leaves, pr_leaves, strict=True)
    ]
    return treedef.unflatten(out)


_NORMALIZERS = {
    None: None,
    "l1": lambda x: jnp.sum(jnp.abs(x)),
    "l2": lambda x: jnp.sqrt(jnp.sum(jnp.square(x))),
    "max": lambda x: jnp.max(jnp.abs(x)),
    "mean": lambda x: jnp.mean(jnp.abs(x)),
}


def check_normalize(normalize: str | None) -> None:
    """Raise ``ValueError`` unless ``normalize`` is a known per-leaf normalization."""
    if normalize not in _NORMALIZERS:
        raise ValueError(
            f"normalize must be one of {sorted(k for k in _NORMALIZERS if k)} or None, "
            f"got {normalize!r}"
        )


def global_topk(
    scores: Any, sparsity: float | jax.Array, prunable: Any, *, normalize: str | None = None
) -> Any:
    """One threshold across all prunable leaves, keeping exactly ``n - round(s n)`` entries.

    ``n`` is the total number of prunable entries. ``normalize`` divides each leaf's scores by
    its ``"l1"``, ``"l2"``, ``"max"`` or ``"mean"`` magnitude first, so that layers of very
    different scale compete fairly (JaxPruner's global pruning uses raw scores: ``None``).
    Ties across leaves: earlier leaf in flatten order, then lower flat index, kept first.
    """
    check_normalize(normalize)
    s_leaves, treedef = _leaves(scores)
    pr_leaves = treedef.flatten_up_to(prunable)
    idx = [i for i, p in enumerate(pr_leaves) if p]
    norm = _NORMALIZERS[normalize]
    keys = []
    for i in idx:
        sc = s_leaves[i].astype(jnp.float32)
        if norm is not None:
            sc = sc / jnp.maximum(norm(sc), jnp.finfo(jnp.float32).tiny)
        keys.append(sortable_key(sc))
    total = sum(int(np.prod(s_leaves[i].shape)) for i in idx)
    kept = _select(keys, num_kept(total, sparsity)) if idx else []
    out: list[Any] = [jnp.bool_(True)] * len(s_leaves)
    for i, m in zip(idx, kept, strict=True):
        out[i] = m
    return treedef.unflatten(out)


def check_nm(n: int, m: int, shape: Sequence[int] | None = None, axis: int = 0, name: str = ""):
    """Validate an N:M pattern (and, given a shape, that M divides the chosen axis)."""
    if not (isinstance(m, int) and m >= 1):
        raise ValueError(f"m must be an int >= 1, got {m!r}")
    if not (isinstance(n, int) and 0 <= n <= m):
        raise ValueError(f"n must be an int in [0, m={m}] (N <= M), got {n!r}")
    if shape is not None:
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis must be in [-{len(shape)}, {len(shape)}), got {axis}")
        if shape[axis] % m:
            where = f" of leaf {name}" if name else ""
            raise ValueError(
                f"m={m} must divide the size {shape[axis]} of axis {axis}{where} (shape {shape})"
            )


def nm_mask(score: jax.Array, n: int, m: int, *, axis: int = 0) -> jax.Array:
    """Keep the ``n`` largest of every ``m`` consecutive entries along ``axis``.

    Axis 0 is the contraction (input) axis of a Flax ``(in, out)`` kernel (Mishra et al. 2021;
    Zhou et al. 2021). Sort-free and transpose-free: the axis is split into ``(groups, m)`` in
    place, and each of the ``m`` slices counts how many of the other ``m - 1`` beat it
    (greater, or equal at a lower index) with elementwise comparisons that fuse into one pass;
    an entry is kept when fewer than ``n`` beat it. Ties keep the lower index.
    """
    check_nm(n, m, score.shape, axis)
    axis = axis % score.ndim
    shape = score.shape
    g = score.astype(jnp.float32).reshape(*shape[:axis], shape[axis] // m, m, *shape[axis + 1 :])
    parts = [jax.lax.index_in_dim(g, i, axis + 1, keepdims=False) for i in range(m)]
    keep = []
    for i, a in enumerate(parts):
        beaten = [(b >= a) if j < i else (b > a) for j, b in enumerate(parts) if j != i]
        rank = sum((x.astype(jnp.int32) for x in beaten), jnp.zeros(a.shape, jnp.int32))
        keep.append(rank < n)
    return jnp.stack(keep, axis=axis + 1).reshape(shape)


def nm_masks(scores: Any, n: int, m: int, prunable: Any, *, axis: int = 0) -> Any:
    """:func:`nm_mask` on every prunable leaf (scalar ``True`` elsewhere)."""
    return jax.tree_util.tree_map(
        lambda s, p: nm_mask(s, n, m, axis=axis) if p else jnp.bool_(True), scores, prunable
    )


def check_block(block: Sequence[int], shape: Sequence[int] | None = None, name: str = ""):
    """Validate a 2-D block size (and, given a shape, that it tiles the last two dims)."""
    if len(block) != 2 or any((not isinstance(b, int)) or b < 1 for b in block):
        raise ValueError(f"block must be a pair of ints >= 1, got {block!r}")
    if shape is not None:
        if len(shape) < 2 or shape[-2] % block[0] or shape[-1] % block[1]:
            where = f" of leaf {name}" if name else ""
            raise ValueError(
                f"block {tuple(block)} must tile the last two dims of shape {tuple(shape)}{where}"
            )


def block_mask(score: jax.Array, sparsity: float | jax.Array, block: Sequence[int]) -> jax.Array:
    """Keep whole ``block``-sized tiles of the last two dims, chosen by tile L2 norm.

    Exactly ``t - round(s t)`` of the ``t`` tiles are kept (ties: lower tile index).
    """
    check_block(block, score.shape)
    bk, bn = block
    *lead, k, n = score.shape
    x = score.astype(jnp.float32).reshape(*lead, k // bk, bk, n // bn, bn)
    norms = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-3, -1)))
    keep = sparsity_mask(norms, sparsity)
    keep = jnp.broadcast_to(keep[..., :, None, :, None], x.shape)
    return keep.reshape(score.shape)


def density(masks: Any, prunable: Any) -> jax.Array:
    """Fraction of prunable entries kept (1.0 when nothing is prunable)."""
    m_leaves, treedef = _leaves(masks)
    pr_leaves = treedef.flatten_up_to(prunable)
    kept = [jnp.sum(m, dtype=jnp.float32) for m, p in zip(m_leaves, pr_leaves, strict=True) if p]
    total = sum(float(np.prod(m.shape)) for m, p in zip(m_leaves, pr_leaves, strict=True) if p)
    return sum(kept) / total if total else jnp.float32(1.0)
