"""Exact selection against an argsort reference (random, tied and constant inputs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import masks


def argsort_topk(score: np.ndarray, k: int) -> np.ndarray:
    """Reference: first k entries of a stable descending argsort (lower index wins ties)."""
    order = np.argsort(-score.ravel(), kind="stable")
    keep = np.zeros(score.size, bool)
    keep[order[:k]] = True
    return keep.reshape(score.shape)


def make_scores(kind: str, shape, rng) -> np.ndarray:
    if kind == "random":
        return rng.normal(size=shape).astype(np.float32)
    if kind == "tied":
        return rng.integers(0, 3, size=shape).astype(np.float32)
    if kind == "narrow":  # keys spread over a few adjacent 16-bit high halves
        return rng.uniform(1.0, 1.05, size=shape).astype(np.float32)
    if kind == "constant":
        return np.full(shape, 0.25, np.float32)
    if kind == "tiny":  # denormals, zeros, -0.0 and huge values mixed
        vals = np.array([0.0, -0.0, 1e-42, 1e-38, 3e38, -3e38, 1.0, -1.0], np.float32)
        return rng.choice(vals, size=shape)
    raise AssertionError(kind)


topk = jax.jit(masks.topk_mask)


@pytest.mark.parametrize("kind", ["random", "tied", "constant", "tiny", "narrow"])
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 9), (3, 4, 6), (40, 50)])
def test_topk_matches_argsort(kind, shape):
    rng = np.random.default_rng(hash((kind, shape)) % 2**32)
    score = make_scores(kind, shape, rng)
    n = score.size
    for k in sorted({0, 1, n // 2, n - 1, n, int(rng.integers(0, n + 1))}):
        if k < 0:
            continue
        got = np.asarray(topk(score, k))
        np.testing.assert_array_equal(got, argsort_topk(score, k), err_msg=f"k={k}")


def test_sparsity_mask_exact_count_half_to_even():
    score = jnp.arange(10, dtype=jnp.float32)
    sparsity_mask = jax.jit(masks.sparsity_mask)
    # round(0.25 * 10) = round(2.5) = 2 (half to even): 8 kept.
    assert int(sparsity_mask(score, 0.25).sum()) == 8
    assert int(sparsity_mask(score, 0.35).sum()) == 6  # round(3.5) = 4 pruned
    np.testing.assert_array_equal(sparsity_mask(score, 0.2), np.arange(10) >= 2)


def test_global_topk_single_threshold_and_exact_count():
    rng = np.random.default_rng(0)
    scores = {
        "a": rng.random((6, 5)).astype(np.float32),
        "b": rng.random((4, 8)).astype(np.float32),
        "bias": np.ones(3, np.float32),
    }
    prunable = {"a": True, "b": True, "bias": False}
    glob = jax.jit(lambda sc, s: masks.global_topk(sc, s, prunable))  # compiled once
    for s in [0.0, 0.3, 0.5, 0.77, 0.99]:
        m = glob(scores, s)
        flat = np.concatenate([scores["a"].ravel(), scores["b"].ravel()])
        ref = argsort_topk(flat, flat.size - int(np.round(np.float32(s) * flat.size)))
        got = np.concatenate([np.asarray(m["a"]).ravel(), np.asarray(m["b"]).ravel()])
        np.testing.assert_array_equal(got, ref)
        assert m["bias"].shape == () and bool(m["bias"])


def test_global_ties_across_leaves_keep_earlier_leaf():
    scores = {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)}
    m = jax.jit(lambda sc: masks.global_topk(sc, 0.5, {"a": True, "b": True}))(scores)
    assert bool(m["a"].all()) and not bool(m["b"].any())


def test_global_normalize_l2_equalizes_scales():
    rng = np.random.default_rng(1)
    base = rng.random((8, 8)).astype(np.float32)
    scores = {"a": base, "b": base * 1000.0}
    raw = masks.global_topk(scores, 0.5, {"a": True, "b": True})
    assert int(raw["a"].sum()) < 10  # raw scores: the big layer wins almost everything
    normed = masks.global_topk(scores, 0.5, {"a": True, "b": True}, normalize="l2")
    assert int(normed["a"].sum()) == int(normed["b"].sum()) == 32
    with pytest.raises(ValueError, match="normalize"):
        masks.global_topk(scores, 0.5, {"a": True, "b": True}, normalize="bogus")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3), (0, 4)])
@pytest.mark.parametrize("axis", [0, 1])
def test_nm_exact_per_group_vs_reference(n, m, axis):
    rng = np.random.default_rng(n * 10 + m)
    shape = (24, 12) if axis == 0 else (12, 24)
    score = rng.integers(0, 4, size=shape).astype(np.float32)  # many ties
    got = np.asarray(jax.jit(lambda s: masks.nm_mask(s, n, m, axis=axis))(score))
    x = np.moveaxis(score, axis, -1)
    g = x.reshape(*x.shape[:-1], -1, m)
    ref = np.zeros(g.shape, bool)
    for idx in np.ndindex(g.shape[:-1]):
        ref[idx][np.argsort(-g[idx], kind="stable")[:n]] = True
    ref = np.moveaxis(ref.reshape(x.shape), -1, axis)
    np.testing.assert_array_equal(got, ref)
    counts = np.moveaxis(got, axis, -1).reshape(*x.shape[:-1], -1, m).sum(-1)
    assert (counts == n).all()


def test_nm_errors():
    with pytest.raises(ValueError, match="N <= M"):
        masks.check_nm(5, 4)
    with pytest.raises(ValueError, match="must divide"):
        masks.nm_mask(jnp.ones((6, 4)), 2, 4, axis=0)


def test_block_mask_keeps_whole_tiles_by_l2_norm():
    rng = np.random.default_rng(2)
    score = rng.normal(size=(8, 12)).astype(np.float32)
    got = np.asarray(masks.block_mask(score, 0.5, (2, 3)))
    tiles = score.reshape(4, 2, 4, 3)
    norms = np.sqrt((tiles**2).sum(axis=(1, 3)))
    ref_tiles = argsort_topk(norms, 8)
    np.testing.assert_array_equal(got, np.repeat(np.repeat(ref_tiles, 2, 0), 3, 1))
    with pytest.raises(ValueError, match="tile"):
        masks.block_mask(score, 0.5, (3, 3))


def test_density():
    m = {"a": jnp.array([[True, False], [False, False]]), "b": jnp.bool_(True)}
    assert float(masks.density(m, {"a": True, "b": False})) == 0.25


def test_layerwise_segments_match_per_leaf_argsort():
    """One selection over many leaves (a segment each) equals per-leaf argsort references,
    with heavy ties so that some leaves need the tie cut and others do not."""
    rng = np.random.default_rng(3)
    scores = {
        "a": rng.integers(0, 3, size=(9, 7)).astype(np.float32),  # many ties
        "b": rng.normal(size=(5, 11)).astype(np.float32),  # no ties
        "c": np.full((4, 4), 0.5, np.float32),  # all tied
        "bias": np.ones(3, np.float32),
    }
    prunable = {"a": True, "b": True, "c": True, "bias": False}
    fn = jax.jit(lambda sc, sp: masks.layerwise(sc, sp, prunable))
    for sp in [(0.3, 0.5, 0.25), (0.77, 0.1, 0.9), (0.0, 0.99, 0.5)]:
        sparsities = {"a": sp[0], "b": sp[1], "c": sp[2], "bias": 0.0}
        got = fn(scores, sparsities)
        for name, s in zip("abc", sp, strict=True):
            n = scores[name].size
            k = n - int(np.round(np.float32(s) * np.float32(n)))
            np.testing.assert_array_equal(np.asarray(got[name]), argsort_topk(scores[name], k))
        assert bool(got["bias"])


def test_nm_flattened_axes_group_rows_of_the_matrix():
    """axis=(0, 1) on (heads, head_dim, d): groups of M consecutive rows of the
    (heads*head_dim, d) matrix, here spanning heads (head_dim=2 < M=4)."""
    rng = np.random.default_rng(4)
    score = rng.normal(size=(4, 2, 3)).astype(np.float32)
    got = np.asarray(jax.jit(lambda s: masks.nm_mask(s, 1, 4, axis=(0, 1)))(score))
    flat = score.reshape(2, 4, 3)
    ref = np.zeros(flat.shape, bool)
    for g in range(2):
        for c in range(3):
            ref[g, np.argmax(flat[g, :, c]), c] = True
    np.testing.assert_array_equal(got, ref.reshape(score.shape))
    with pytest.raises(ValueError, match="must divide the size 6"):
        masks.nm_mask(jnp.ones((3, 2, 4)), 2, 4, axis=(0, 1))
    with pytest.raises(ValueError, match="consecutive"):
        masks.nm_mask(jnp.ones((4, 2, 4)), 2, 4, axis=(0, 2))
