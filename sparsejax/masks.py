"""Exact, sort-free mask selection: layer-wise top-k, global top-k, N:M and block masks.

Every selector keeps an *exact* number of entries (DESIGN.md, "Selection"): a leaf of ``n``
entries at sparsity ``s`` keeps ``n - round(s * n)`` of them (``round`` is half-to-even on the
float32 product, the same rule numpy applies). Ties are broken deterministically: among equal
scores the lower flat index is kept.

The top-k is found without sorting: the float32 scores are mapped to ``uint32`` keys whose
unsigned order is the float order, the k-th largest key is found by a radix select over
its 16-bit digits (2 histogram passes, scatter-adds into 65,536 bins; same result as DESIGN.md's
32-pass bit bisection), the counts above and at the threshold come from the histograms, and
ties at the threshold, only when some tied entries must be dropped, by a second radix select
on their flat positions. Cost: a few O(n) passes, against O(n log n) with a large
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
_SPLIT = 1 << (_DIGIT_BITS // 2)  # the 2**16 bins are scanned as 256 blocks of 256
_DROP = jax.lax.GatherScatterMode.FILL_OR_DROP
_IN_BOUNDS = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS


def _histograms(index: jax.Array, segments: int, mode) -> jax.Array:
    """``(segments, 2**16)`` counts of the int32 flat bin ``index`` by one scatter-add.

    With ``FILL_OR_DROP`` every index outside ``[0, segments * 2**16)``, negative ones
    included, is dropped (``lax.scatter_add`` does no negative-index normalization).
    """
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
    )
    hist = jax.lax.scatter_add(
        jnp.zeros(segments * _BINS, jnp.int32), index.reshape(-1, 1),
        jnp.ones(index.size, jnp.int32), dnums, mode=mode,
    )
    return hist.reshape(segments, _BINS)


def _suffix_sums(x: jax.Array) -> jax.Array:
    """``out[..., i] = sum(x[..., i:])`` over a short last axis (triangular masked sum).

    Cheaper to compile than ``cumsum`` (a log-depth scan) and exact in int32.
    """
    i = jnp.arange(x.shape[-1])
    return jnp.sum(jnp.where(i[None, :] >= i[:, None], x[..., None, :], 0), axis=-1)


def _take(x: jax.Array, i: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]


def _pick_digit(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per segment: digit ``d`` of the k-th largest entry, #entries above ``d``, #at ``d``.

    ``hist`` is ``(segments, 2**16)``, ``k`` is ``(segments,)``. Two levels (block of 256
    digits, then digit in the block) of suffix sums, which are non-increasing, so the digit is
    the number of them that reach ``k``, minus one.
    """
    h = hist.reshape(hist.shape[0], _SPLIT, _SPLIT)
    at_least_block = _suffix_sums(jnp.sum(h, axis=2))  # #(digit >= 256 b)
    b = jnp.sum(at_least_block >= k[:, None], axis=1, dtype=jnp.int32) - 1
    nxt = jnp.minimum(b + 1, _SPLIT - 1)
    above_block = jnp.where(b < _SPLIT - 1, _take(at_least_block, nxt), 0)
    row = jnp.take_along_axis(h, b[:, None, None], axis=1)[:, 0, :]
    at_least = above_block[:, None] + _suffix_sums(row)  # #(digit >= 256 b + j)
    j = jnp.sum(at_least >= k[:, None], axis=1, dtype=jnp.int32) - 1
    nxt = jnp.minimum(j + 1, _SPLIT - 1)
    above = jnp.where(j < _SPLIT - 1, _take(at_least, nxt), above_block)
    return b * _SPLIT + j, above, _take(row, j)


def _kth_largest_key(
    keys: Sequence[jax.Array], segs: Sequence[int], k: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per segment, radix select of the k-th largest key (1 <= k[s] <= size of segment s).

    ``keys[i]`` belongs to segment ``segs[i]``; ``k`` has one entry per segment. Returns
    ``(thresh, n_above, n_equal)`` per segment: the key, and how many keys of the segment are
    greater than and equal to it. Two passes over 16-bit digits, most significant first (same
    result as DESIGN.md's 32 passes of bit-wise bisection), each a single scatter-add over all
    arrays and segments at once. Pass 2 histograms ``key - (d1 << 16)``, which lies in
    ``[0, 2**16)`` exactly for the keys in the chosen high half; the others are dropped.
    """
    n_seg = k.shape[0]
    cat = jnp.concatenate
    high = cat([((key >> np.uint32(_DIGIT_BITS)).astype(jnp.int32) + s * _BINS).ravel()
                for key, s in zip(keys, segs, strict=True)])
    d1, above1, _ = _pick_digit(_histograms(high, n_seg, _IN_BOUNDS), k)
    base = d1.astype(jnp.uint32) << np.uint32(_DIGIT_BITS)

    def low(key, s):
        diff = key - base[s]
        idx = jax.lax.bitcast_convert_type(diff, jnp.int32)  # negative when wrapped: dropped
        if n_seg > 1:  # keep out-of-range keys out of the other segments' bins
            idx = jnp.where(diff < np.uint32(_BINS), idx + s * _BINS, -1)
        return idx.ravel()

    hist = _histograms(cat([low(key, s) for key, s in zip(keys, segs, strict=True)]), n_seg, _DROP)
    d2, above2, n_equal = _pick_digit(hist, k - above1)
    return base | d2.astype(jnp.uint32), above1 + above2, n_equal


def _select(keys: Sequence[jax.Array], segs: Sequence[int], k: jax.Array) -> list[jax.Array]:
    """Boolean masks keeping exactly the ``k[s]`` largest keys of every segment ``s``.

    ``keys[i]`` belongs to segment ``segs[i]`` (layer-wise: one leaf per segment; global: all
    leaves in segment 0). Ties at a segment's threshold are kept in flat order: array by
    array, then flat index. Only when some tied entries must be dropped (one ``lax.cond`` for
    all segments, returning one position per segment), a running count of the ties finds the
    last one kept. (A scatter-based branch, even never taken, slowed the whole step on CPU.)
    """
    n_seg = max(segs) + 1
    sizes = [0] * n_seg
    for key, s in zip(keys, segs, strict=True):
        sizes[s] += key.size
    if list(segs) != sorted(segs) or sum(sizes) >= 2**31:
        raise ValueError(f"segments must be contiguous and hold < 2**31 entries, got {sizes}")
    k = jnp.asarray(k, jnp.int32).reshape(n_seg)
    k1 = jnp.maximum(k, 1)
    thresh, n_above, n_ties = _kth_largest_key(keys, segs, k1)
    ties_left = k1 - n_above  # in [1, n_ties]: tied entries still kept

    def positions(key, s, offset):
        """Complemented flat positions (>= 2**31 > 0) of the tied entries, 0 elsewhere."""
        pos = jax.lax.broadcasted_iota(jnp.uint32, (key.size,), 0) + np.uint32(offset)
        return jnp.where(key == thresh[s], ~pos.reshape(key.shape), np.uint32(0))

    def offsets():
        seen, out = [0] * n_seg, []
        for key, s in zip(keys, segs, strict=True):
            out.append(seen[s])
            seen[s] += key.size
        return out

    def tie_cut(keys):
        # Rank of every tie in one running count over all arrays (segments are contiguous):
        # the cut of segment s is the position of its ties_left[s]-th tie.
        tie = jnp.concatenate([(key == thresh[s]).ravel() for key, s in zip(keys, segs,
                                                                            strict=True)])
        count = jnp.cumsum(tie, dtype=jnp.int32)
        starts = np.cumsum([0] + sizes[:-1])
        before = jnp.stack([count[st - 1] if st else jnp.int32(0) for st in starts])
        first = jnp.searchsorted(count, before + ties_left, side="left").astype(jnp.int32)
        return ~(first - jnp.asarray(starts, jnp.int32)).astype(jnp.uint32)

    # Only scalars leave the cond: cut 0 keeps every tie (all positions are >= 0).
    cut = jax.lax.cond(
        jnp.all(ties_left >= n_ties), lambda keys: jnp.zeros(n_seg, jnp.uint32), tie_cut, list(keys)
    )
    return [
        ((key > thresh[s]) | (positions(key, s, o) >= jnp.maximum(cut[s], 1))) & (k[s] > 0)
        for key, s, o in zip(keys, segs, offsets(), strict=True)
    ]


def topk_mask(score: jax.Array, k: int | jax.Array) -> jax.Array:
    """Keep exactly the ``k`` highest scores of one array (ties: lower flat index kept).

    ``k`` may be traced. Reference: the first ``k`` entries of a stable descending argsort.
    """
    return _select([sortable_key(score)], [0], k)[0]


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
    idx = [i for i, p in enumerate(pr_leaves) if p]
    out: list[Any] = [jnp.bool_(True)] * len(s_leaves)
    if idx:  # one selection for all leaves: a segment per leaf
        k = jnp.stack([num_kept(s_leaves[i].size, sp_leaves[i]) for i in idx])
        keys = [sortable_key(s_leaves[i]) for i in idx]
        for i, m in zip(idx, _select(keys, list(range(len(idx))), k), strict=True):
            out[i] = m
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
    kept = _select(keys, [0] * len(keys), num_kept(total, sparsity)) if idx else []
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
