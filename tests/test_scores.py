"""Scores against NumPy references (float64 loops for GBLM's broadcasting), under jit."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import masks as masks_lib
from sparsejax import scores as S


def test_doctests():
    assert doctest.testmod(S).failed == 0


def make_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=3)},
        "conv": rng.normal(size=(2, 2, 4, 3)),
        "half": jnp.asarray(rng.normal(size=(3, 3)), jnp.bfloat16),
    }


def as_f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def assert_tree_close(got, want, atol=0.0):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == jnp.float32 and g.shape == np.shape(w)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w, np.float64), rtol=1e-6, atol=atol)


def test_magnitude():
    params = as_f32(make_tree())
    want = jax.tree.map(lambda w: np.abs(np.asarray(w, np.float64)), params)
    assert_tree_close(jax.jit(S.magnitude)(params), want)
    bf16 = make_tree()["half"]
    assert S.magnitude(bf16).dtype == jnp.float32


def test_saliency():
    params, grads = as_f32(make_tree(0)), as_f32(make_tree(1))
    want = jax.tree.map(
        lambda w, g: np.abs(np.asarray(w, np.float64) * np.asarray(g, np.float64)), params, grads
    )
    assert_tree_close(jax.jit(S.saliency)(params, grads), want, atol=1e-6)
    with pytest.raises(ValueError, match="grads is required"):
        S.saliency(params, None)


def test_random_is_keyed_uniform_and_distinct_per_leaf():
    params = {"a": jnp.zeros((64, 64)), "b": jnp.zeros((64, 64)), "c": jnp.zeros(7)}
    key = jax.random.key(3)
    rand = jax.jit(S.random)
    s1 = rand(params, None, key)
    s2 = rand(params, None, key)
    for leaf in ("a", "b", "c"):
        np.testing.assert_array_equal(s1[leaf], s2[leaf])  # deterministic in the key
        assert s1[leaf].dtype == jnp.float32 and s1[leaf].shape == params[leaf].shape
        assert float(s1[leaf].min()) >= 0.0 and float(s1[leaf].max()) < 1.0
    assert not np.array_equal(s1["a"], s1["b"])  # same shape, different stream
    assert abs(float(s1["a"].mean()) - 0.5) < 0.02  # 4096 U(0,1) draws: sd of mean ~0.0045
    other = rand(params, None, jax.random.key(4))
    assert not np.array_equal(s1["a"], other["a"])
    with pytest.raises(ValueError, match="key is required"):
        S.random(params)


def test_random_scores_of_a_leaf_do_not_depend_on_other_leaves():
    """Adding a non-prunable leaf (or any leaf) leaves every other leaf's scores, and so the
    weights a random mask keeps, unchanged: keys come from each leaf's path."""
    key = jax.random.key(7)
    base = {"b": {"kernel": jnp.zeros((16, 8))}, "d": {"kernel": jnp.zeros((8, 4))}}
    more = {
        "a": {"bias": jnp.zeros(16), "kernel": jnp.zeros((4, 16))},  # flattens before "b"
        "b": {"bias": jnp.zeros(8), "kernel": jnp.zeros((16, 8))},
        "d": {"kernel": jnp.zeros((8, 4))},
    }
    s1, s2 = S.random(base, key=key), S.random(more, key=key)
    for name in ("b", "d"):
        np.testing.assert_array_equal(s1[name]["kernel"], s2[name]["kernel"])
    pr1 = jax.tree.map(lambda x: x.ndim == 2, base)
    pr2 = jax.tree.map(lambda x: x.ndim == 2, more)
    sp1 = jax.tree.map(lambda _: 0.75, base)
    sp2 = jax.tree.map(lambda _: 0.75, more)
    m1 = jax.jit(lambda s: masks_lib.layerwise(s, sp1, pr1))(s1)
    m2 = jax.jit(lambda s: masks_lib.layerwise(s, sp2, pr2))(s2)
    for name in ("b", "d"):
        np.testing.assert_array_equal(m1[name]["kernel"], m2[name]["kernel"])
    assert int(m1["b"]["kernel"].sum()) == 32
    # The key is a function of the path: renaming a leaf changes its draws.
    renamed = S.random({"c": {"kernel": jnp.zeros((16, 8))}}, key=key)
    assert not np.array_equal(renamed["c"]["kernel"], s1["b"]["kernel"])


def gblm_reference(w, g, x, alpha):
    """Loop form of |w_ij| * (||x_i|| + alpha |g_ij|) with i the input axis (-2)."""
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    out = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        xi = 0.0 if x is None else (x[idx[-2]] if w.ndim >= 2 else x[idx[0]])
        out[idx] = abs(w[idx]) * (xi + alpha * abs(g[idx]))
    return out


@pytest.mark.parametrize("alpha", [1.0, 100.0])
def test_gblm_matches_loop_reference(alpha):
    params, grads = as_f32(make_tree(0)), as_f32(make_tree(1))
    rng = np.random.default_rng(2)
    norms = {
        "dense": {"kernel": rng.uniform(size=5), "bias": None},  # (in=5, out=3) kernel
        "conv": rng.uniform(size=4),  # HWIO conv: input channels on axis -2
        "half": rng.uniform(size=3),
    }
    got = jax.jit(lambda p, g: S.gblm(p, g, act_norms=norms, alpha=alpha))(params, grads)
    want = {
        "dense": {
            "kernel": gblm_reference(
                params["dense"]["kernel"], grads["dense"]["kernel"], norms["dense"]["kernel"], alpha
            ),
            "bias": gblm_reference(params["dense"]["bias"], grads["dense"]["bias"], None, alpha),
        },
        "conv": gblm_reference(params["conv"], grads["conv"], norms["conv"], alpha),
        "half": gblm_reference(params["half"], grads["half"], norms["half"], alpha),
    }
    assert_tree_close(got, want, atol=1e-5)
    factory = jax.jit(S.gblm_score(norms, alpha=alpha))(params, grads, None)
    assert_tree_close(factory, want, atol=1e-5)


def test_gblm_prefix_and_errors():
    params = {"k": jnp.ones((4, 2)), "v": jnp.ones((4, 2))}
    grads = jax.tree.map(jnp.zeros_like, params)
    got = S.gblm(params, grads, act_norms={"k": jnp.arange(4.0), "v": None})
    np.testing.assert_array_equal(got["k"], np.repeat(np.arange(4.0)[:, None], 2, axis=1))
    np.testing.assert_array_equal(got["v"], np.zeros((4, 2)))
    with pytest.raises(ValueError, match="needs 4 input-feature norms"):
        S.gblm(params, grads, act_norms={"k": jnp.ones(2), "v": None})
    with pytest.raises(ValueError, match="structure of params"):
        S.gblm(params, grads, act_norms={"k": None})
    with pytest.raises(ValueError, match="act_norms is required"):
        S.gblm_score(None)
    with pytest.raises(ValueError, match="grads is required"):
        S.gblm(params, None, act_norms={"k": None, "v": None})


def test_get():
    assert S.get("magnitude") is S.magnitude
    assert S.get("random") is S.random
    assert S.get("saliency") is S.saliency
    with pytest.raises(ValueError, match=r"\['magnitude', 'random', 'saliency'\]"):
        S.get("taylor")
