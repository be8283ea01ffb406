"""Exact radix selection of the k largest ``uint32`` keys, per segment, without sorting.

The engine behind :mod:`sparsejax.masks` (docs/design.md, "Selection"). Float32 scores are
mapped to ``uint32`` keys whose unsigned order is the float order (:func:`sortable_key`); the
k-th largest key of every segment is found by a radix select over its two 16-bit digits (2
passes, each a single scatter-add into 65,536 bins per segment; the same result as a 32-pass
bisection over the key's bits); the counts above and at the threshold come from the histograms.
Ties at the threshold are kept in flat order, and only when some tied entries must be dropped
does a running count of them run (under ``lax.cond``). Cost: about three O(n) passes, against
O(n log n) with a large constant for ``argsort``/``top_k`` on CPU.

Segments let one selection serve many arrays at once: layer-wise masks give every leaf its own
segment (one scatter per pass for the whole model, so compile time does not grow with the
number of leaves), global masks put all leaves in segment 0.
"""

from __future__ import annotations

from collections.abc import Sequence

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


_DIGIT_BITS = 16  # two histogram passes of 65,536 bins over the uint32 keys
_BINS = 1 << _DIGIT_BITS
_SPLIT = 1 << (_DIGIT_BITS // 2)  # the 2**16 bins are scanned as 256 blocks of 256
_DROP = jax.lax.GatherScatterMode.FILL_OR_DROP
_IN_BOUNDS = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS


def _histograms(index: jax.Array, segments: int, mode) -> jax.Array:
    """``(segments, 2**16)`` counts of the int32 flat bin ``index`` (any shape) by one
    scatter-add.

    ``index`` keeps its shape (no ravel), so under GSPMD a sharded ``index`` scatters into
    per-device partial histograms that one all-reduce sums: no gather of the keys. With
    ``FILL_OR_DROP`` every index outside ``[0, segments * 2**16)``, negative ones included,
    is dropped (``lax.scatter_add`` does no negative-index normalization).
    """
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
    )
    hist = jax.lax.scatter_add(
        jnp.zeros(segments * _BINS, jnp.int32), index[..., None],
        jnp.ones(index.shape, jnp.int32), dnums, mode=mode,
    )
    return hist.reshape(segments, _BINS)


def _histogram_of(bins, keys: Sequence[jax.Array], segs: Sequence[int], segments: int,
                  mode) -> jax.Array:
    """Sum of the histograms of ``bins(key, s)`` over all arrays: arrays of one shape are
    stacked along a new leading axis and share one scatter (compile time grows with the
    number of distinct shapes, not of layers), and no array is flattened or concatenated
    with another, so a sharded array keeps its sharding (a flattened concatenation makes
    GSPMD gather every array whole onto each device)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(tuple(key.shape), []).append(i)
    total = None
    for idx in groups.values():
        stacked = jnp.stack([bins(keys[i], segs[i]) for i in idx])
        hist = _histograms(stacked, segments, mode)
        total = hist if total is None else total + hist
    return total


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
    greater than and equal to it. Two passes over 16-bit digits, most significant first (the
    same result as 32 passes of bit-wise bisection), each a single scatter-add over all
    arrays and segments at once. Pass 2 histograms ``key - (d1 << 16)``, which lies in
    ``[0, 2**16)`` exactly for the keys in the chosen high half; the others are dropped.
    """
    n_seg = k.shape[0]

    def high(key, s):
        return (key >> np.uint32(_DIGIT_BITS)).astype(jnp.int32) + s * _BINS

    d1, above1, _ = _pick_digit(_histogram_of(high, keys, segs, n_seg, _IN_BOUNDS), k)
    base = d1.astype(jnp.uint32) << np.uint32(_DIGIT_BITS)

    def low(key, s):
        diff = key - base[s]
        idx = jax.lax.bitcast_convert_type(diff, jnp.int32)  # negative when wrapped: dropped
        if n_seg > 1:  # keep out-of-range keys out of the other segments' bins
            idx = jnp.where(diff < np.uint32(_BINS), idx + s * _BINS, -1)
        return idx

    hist = _histogram_of(low, keys, segs, n_seg, _DROP)
    d2, above2, n_equal = _pick_digit(hist, k - above1)
    return base | d2.astype(jnp.uint32), above1 + above2, n_equal


def _flat_position(shape: tuple[int, ...], offset: int) -> jax.Array:
    """``offset + `` the row-major flat index of every entry of an array of ``shape``, as
    uint32, built from one iota per axis (no reshape of a flat iota, which GSPMD would have
    to gather to shard like the array)."""
    pos = jnp.full(shape, np.uint32(offset), jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    return pos


def select(keys: Sequence[jax.Array], segs: Sequence[int], k: jax.Array) -> list[jax.Array]:
    """Boolean masks keeping exactly the ``k[s]`` largest keys of every segment ``s``.

    ``keys[i]`` belongs to segment ``segs[i]`` (layer-wise: one leaf per segment; global: all
    leaves in segment 0). Ties at a segment's threshold are kept in flat order: array by
    array, then flat index. Only when some tied entries must be dropped (one ``lax.cond`` for
    all segments, returning one position per segment), a second radix select over the tied
    entries' complemented positions finds the last one kept. Every pass is elementwise or a
    histogram, so arrays sharded over a device mesh are never gathered (the histograms are
    summed across devices).
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

    def offsets():
        seen, out = [0] * n_seg, []
        for key, s in zip(keys, segs, strict=True):
            out.append(seen[s])
            seen[s] += key.size
        return out

    offs = offsets()

    def positions(key, s, offset):
        """Complemented flat positions in the segment (>= 2**31 > 0) of the tied entries,
        0 elsewhere."""
        return jnp.where(key == thresh[s], ~_flat_position(key.shape, offset), np.uint32(0))

    def tie_cut(keys):
        # The ties_left[s]-th largest complemented position among segment s's ties is the
        # complement of the last tie kept; the other entries (0) rank below every tie.
        pos = [positions(key, s, o) for key, s, o in zip(keys, segs, offs, strict=True)]
        return _kth_largest_key(pos, segs, ties_left)[0]

    # Only scalars leave the cond: cut 0 keeps every tie (all positions are >= 0).
    cut = jax.lax.cond(
        jnp.all(ties_left >= n_ties), lambda keys: jnp.zeros(n_seg, jnp.uint32), tie_cut, list(keys)
    )
    return [
        ((key > thresh[s]) | (positions(key, s, o) >= jnp.maximum(cut[s], 1))) & (k[s] > 0)
        for key, s, o in zip(keys, segs, offs, strict=True)
    ]
