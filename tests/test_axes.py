"""Contraction axes of real Flax kernels; N:M groups and block tiles along them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from sparsejax import axes, masks
from sparsejax.prunable import path_str, prunable_tree


class Linen(nn.Module):
    @nn.compact
    def __call__(self, x_img, x_seq):
        y = nn.Conv(8, (3, 3), name="Conv_0")(x_img)
        y = nn.ConvTranspose(4, (2, 2), name="ConvTranspose_0")(y)
        z = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(x_seq)
        z = nn.DenseGeneral((2, 4), name="DenseGeneral_0")(z)  # kernel (16, 2, 4)
        return y.sum() + nn.Dense(4, name="Dense_0")(z.reshape(z.shape[0], -1)).sum()


@pytest.fixture(scope="module")
def linen_params():
    init = Linen().init  # shapes only: ShapeDtypeStruct leaves
    return jax.eval_shape(init, jax.random.key(0), jnp.ones((1, 6, 6, 4)), jnp.ones((1, 3, 16)))[
        "params"
    ]


def leaf_axes(params, axis="contraction"):
    out = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if "kernel" in path_str(p).split("/"):
            try:
                out[path_str(p)] = axes.contraction_axes(p, leaf, axis)
            except ValueError as err:
                out[path_str(p)] = str(err)
    return out


def test_default_axes_of_linen_kernels(linen_params):
    got = leaf_axes(linen_params)
    assert got["Conv_0/kernel"] == (2,)  # (3, 3, Cin=4, 8)
    assert got["ConvTranspose_0/kernel"] == (2,)  # (2, 2, Cin=8, 4)
    assert got["Dense_0/kernel"] == (0,)
    for name in ("query", "key", "value"):  # (d=16, heads=2, head_dim=8)
        assert got[f"attn/{name}/kernel"] == (0,)
    assert got["attn/out/kernel"] == (0, 1)  # (heads, head_dim, d)
    err = got["DenseGeneral_0/kernel"]
    assert "'DenseGeneral_0/kernel'" in err and "explicit axis" in err and "per-leaf" in err


def test_default_axes_of_nnx_attention_and_conv():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.mha = nnx.MultiHeadAttention(4, 16, qkv_features=16, decode=False, rngs=rngs)
            self.conv1d = nnx.Conv(3, 8, (5,), rngs=rngs)  # (5, 3, 8): a conv* module

    params = nnx.state(nnx.eval_shape(lambda: M(nnx.Rngs(0))), nnx.Param)
    got = leaf_axes(params)
    assert got["mha/query/kernel/value"] == (0,) and got["mha/out/kernel/value"] == (0, 1)
    assert got["conv1d/kernel/value"] == (1,)


def test_explicit_and_per_leaf_axes(linen_params):
    got = leaf_axes(linen_params, {"DenseGeneral_0": 0, r"attn/out": (0, 1), "Dense_0": -1})
    assert got["DenseGeneral_0/kernel"] == (0,)
    assert got["Dense_0/kernel"] == (1,)  # the regex overrides the default
    assert got["Conv_0/kernel"] == (2,)  # no regex matches: the default
    assert leaf_axes(linen_params, 1)["Conv_0/kernel"] == (1,)
    leaf = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match="consecutive"):
        axes.contraction_axes((), leaf, (0, 2))
    with pytest.raises(ValueError, match="out of range"):
        axes.contraction_axes((), leaf, 3)
    for bad in ["rows", 1.5, (), {"a": {"b": 0}}, {"(": 0}]:
        with pytest.raises(ValueError, match="axis"):
            axes.check_spec(bad)


def test_matrix_roundtrip():
    x = jnp.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    for lay in [axes.Layout((0, 1), (2,), (3,)), axes.Layout((), (1, 2), (0, 3)),
                axes.Layout((), (3,), (0, 1, 2))]:
        mat = axes.to_matrix(x, lay)
        assert mat.ndim == len(lay.batch) + 2
        np.testing.assert_array_equal(axes.from_matrix(mat, lay, x.shape), x)


def nm_reference(score, n, m, rows):
    """Group M consecutive entries of the (prod(rows), rest) matrix (rows leading or moved
    to the front) along its first axis, argsort each group (stable: lower index wins)."""
    x = np.moveaxis(score, rows, range(len(rows)))
    mat = x.reshape(-1, m, int(np.prod(x.shape[len(rows):])))
    keep = np.zeros(mat.shape, bool)
    for g in range(mat.shape[0]):
        for c in range(mat.shape[2]):
            keep[g, np.argsort(-mat[g, :, c], kind="stable")[:n], c] = True
    return np.moveaxis(keep.reshape(x.shape), range(len(rows)), rows)


def test_nm_masks_along_default_axes(linen_params):
    rng = np.random.default_rng(0)
    scores = jax.tree.map(lambda w: rng.integers(0, 4, w.shape).astype(np.float32), linen_params)
    per_leaf = {"DenseGeneral_0": 0}
    tree = prunable_tree(scores)
    got = jax.jit(lambda s: masks.nm_masks(s, 2, 4, tree, axis=per_leaf))(scores)
    flat = {path_str(p): (s, np.asarray(g)) for (p, s), g in zip(
        jax.tree_util.tree_flatten_with_path(scores)[0], jax.tree.leaves(got), strict=True)}
    for name, rows in [("Conv_0/kernel", [2]), ("ConvTranspose_0/kernel", [2]),
                       ("attn/query/kernel", [0]), ("attn/out/kernel", [0, 1]),
                       ("Dense_0/kernel", [0]), ("DenseGeneral_0/kernel", [0])]:
        score, mask = flat[name]
        np.testing.assert_array_equal(mask, nm_reference(score, 2, 4, rows), err_msg=name)
    conv = flat["Conv_0/kernel"][1]  # exactly 2 of every 4 consecutive input channels
    assert (conv.reshape(3, 3, 1, 4, 8).sum(axis=3) == 2).all()
    assert flat["Conv_0/bias"][1].shape == ()


def test_nm_indivisible_leaves_one_error_or_skipped():
    params = {
        "Conv_0": {"kernel": jnp.ones((3, 3, 3, 8))},  # Cin = 3
        "Dense_0": {"kernel": jnp.ones((6, 8))},  # in = 6
        "Dense_1": {"kernel": jnp.ones((8, 6))},  # fits
    }
    tree = prunable_tree(params)
    with pytest.raises(ValueError) as err:
        masks.nm_masks(params, 2, 4, tree)
    msg = str(err.value)
    assert "2 prunable leaves" in msg and "Conv_0/kernel" in msg and "Dense_0/kernel" in msg
    assert "Dense_1" not in msg and "skip_indivisible=True" in msg
    got = masks.nm_masks(params, 2, 4, tree, skip_indivisible=True)
    assert bool(got["Conv_0"]["kernel"].all()) and got["Conv_0"]["kernel"].shape == (3, 3, 3, 8)
    assert bool(got["Dense_0"]["kernel"].all())
    assert int(got["Dense_1"]["kernel"].sum()) == 24
    plan = masks.nm_plan(params, 4, tree, skip_indivisible=True)
    assert set(plan.skipped) == {"Conv_0/kernel", "Dense_0/kernel"}
    assert plan.axes == {"Dense_1/kernel": (0,)}
    with pytest.raises(ValueError, match=r"\['nope'\] match no prunable leaf"):
        masks.nm_plan(params, 4, tree, axis={"nope": 0, "Dense_1": 0}, skip_indivisible=True)


def block_reference(mat, sparsity, block):
    """Tile a (..., R, C) matrix, keep the top tiles by L2 norm across all of them."""
    bk, bn = block
    *lead, r, c = mat.shape
    t = mat.reshape(*lead, r // bk, bk, c // bn, bn)
    norms = np.sqrt((t.astype(np.float64) ** 2).sum(axis=(-3, -1))).ravel()
    kept = norms.size - int(np.round(np.float32(sparsity) * norms.size))
    keep = np.zeros(norms.size, bool)
    keep[np.argsort(-norms, kind="stable")[:kept]] = True
    keep = keep.reshape(*lead, r // bk, 1, c // bn, 1)
    return np.broadcast_to(keep, t.shape).reshape(mat.shape)


def test_block_masks_tile_the_matrix_the_layer_multiplies_by(linen_params):
    rng = np.random.default_rng(1)
    scores = jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), linen_params)
    tree = prunable_tree(scores)
    sparsities = jax.tree.map(lambda _: 0.5, scores)
    got = jax.jit(
        lambda s: masks.block_masks(s, sparsities, (4, 4), tree, axis={"DenseGeneral": 0})
    )(scores)
    q = scores["attn"]["query"]["kernel"]  # (16, 2, 8) -> the (16, 16) matrix
    want = block_reference(q.reshape(16, 16), 0.5, (4, 4)).reshape(q.shape)
    np.testing.assert_array_equal(np.asarray(got["attn"]["query"]["kernel"]), want)
    o = scores["attn"]["out"]["kernel"]  # (2, 8, 16) -> (16, 16)
    want = block_reference(o.reshape(16, 16), 0.5, (4, 4)).reshape(o.shape)
    np.testing.assert_array_equal(np.asarray(got["attn"]["out"]["kernel"]), want)
    c = scores["Conv_0"]["kernel"]  # (3, 3, 4, 8): a (4, 8) matrix per window position
    np.testing.assert_array_equal(np.asarray(got["Conv_0"]["kernel"]),
                                  block_reference(c, 0.5, (4, 4)))
    with pytest.raises(ValueError, match="ConvTranspose_0/kernel"):  # (2, 2, 8, 4): 4 x 4 fits
        masks.block_masks(scores, sparsities, (8, 8), tree, axis={"DenseGeneral": 0})
