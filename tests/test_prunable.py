"""The default prunable predicate matches whole path components, floating-point leaves only;
``describe`` says why for every leaf."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import sparsejax
from sparsejax import prunable as P

K = jax.tree_util.DictKey


def path(name: str) -> tuple:
    return tuple(K(c) for c in name.split("/"))


# Every leaf below is a 2-D float32 matrix, so only the path decides.
PRUNABLE = [
    "ConvTranspose_0/kernel",  # "pos" inside a component name
    "compose/kernel",
    "posterior_head/kernel",
    "prenorm_mlp/kernel",  # "norm" inside a component name
    "Conv_0/kernel",
    "Dense_3/kernel",
    "blocks/0/attn/query/kernel",
]
DENSE = [
    "embed/embedding",
    "Embed_0/embedding",
    "token_embedding/kernel",
    "unembed/kernel",  # GPT's untied head: named after the embedding, stays dense
    "pos_embed",
    "position_embeddings/embedding",
    "wpe/embedding",
    "wte/embedding",
    "pos",
    "final_norm/kernel",
    "norm/kernel",
    "norm1/kernel",
    "LayerNorm_0/kernel",
    "BatchNorm_3/kernel",
    "GroupNorm_0/kernel",
    "RMSNorm_0/kernel",
    "rmsnorm/kernel",
    "ln/kernel",
    "ln_f/kernel",
    "ln_1/kernel",
    "attn/bias",  # a 2-D bias (attention's (heads, head_dim))
    "mlp/scale",
]


@pytest.mark.parametrize("name", PRUNABLE)
def test_default_prunes_kernels_whose_components_are_not_excluded(name):
    assert P.default_prunable(path(name), np.ones((4, 4), np.float32))


@pytest.mark.parametrize("name", DENSE)
def test_default_keeps_embeddings_norms_biases_scales_dense(name):
    leaf = np.ones((4, 4), np.float32)
    assert not P.default_prunable(path(name), leaf)
    assert "component" in P.default_prunable.reason(path(name), leaf)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.bool_, np.complex64])
def test_non_float_leaves_are_never_prunable(dtype):
    leaf = np.ones((8, 8), dtype)
    assert not P.default_prunable(path("Dense_0/kernel"), leaf)
    assert "not floating point" in P.default_prunable.reason(path("Dense_0/kernel"), leaf)
    assert not P.excluding()(path("Dense_0/kernel"), leaf)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_float_dtypes_and_shape_structs_are_prunable(dtype):
    assert P.default_prunable(path("Dense_0/kernel"), jnp.ones((4, 4), dtype))
    struct = jax.ShapeDtypeStruct((4, 4), dtype)
    assert P.default_prunable(path("Dense_0/kernel"), struct)
    assert not P.default_prunable(path("Dense_0/kernel"), jnp.ones(4, dtype))


def test_linen_cnn_params_and_integer_step_leaf():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            x = nn.ConvTranspose(4, (3, 3))(x)
            x = nn.LayerNorm()(x)
            return nn.Dense(2)(x.reshape(x.shape[0], -1))

    params = jax.eval_shape(Net().init, jax.random.key(0), jnp.ones((1, 4, 4, 3)))["params"]
    params = {**params, "step": jnp.zeros((2, 2), jnp.int32)}
    flags = jax.tree_util.tree_flatten_with_path(P.prunable_tree(params))[0]
    got = {P.path_str(p) for p, f in flags if f}
    assert got == {"Conv_0/kernel", "ConvTranspose_0/kernel", "Dense_0/kernel"}


def test_nnx_paths_drop_the_variable_value_attribute():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.ln_f = nnx.LayerNorm(4, rngs=rngs)
            self.value = nnx.Linear(4, 4, rngs=rngs)  # attention-style name "value"
            self.embed = nnx.Embed(10, 4, rngs=rngs)

    params = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
    flags = jax.tree_util.tree_flatten_with_path(P.prunable_tree(params))[0]
    assert {P.path_str(p) for p, f in flags if f} == {"value/kernel/value"}


def test_excluding_uses_component_semantics():
    pred = P.excluding("head", "*_proj", "mlp*")
    leaf = np.ones((4, 4), np.float32)
    assert not pred(path("head/kernel"), leaf)
    assert not pred(path("Head_0/kernel"), leaf)  # the word with a layer index
    assert pred(path("forehead/kernel"), leaf)  # substring only: not excluded
    assert pred(path("heads/kernel"), leaf)
    assert not pred(path("mlp_block/kernel"), leaf)  # prefix pattern
    assert not pred(path("q_proj/kernel"), leaf)  # wildcard pattern: whole component
    assert pred(path("q_proj_extra/kernel"), leaf)
    assert pred(path("embed/embedding"), leaf)  # the default list is not included...
    extended = P.excluding(*P.DEFAULT_EXCLUDE, "head")
    assert not extended(path("embed/embedding"), leaf)  # ...unless extended explicitly
    assert not P.excluding("x", min_ndim=3)(path("a/kernel"), leaf)
    with pytest.raises(ValueError, match="non-empty strings"):
        P.excluding("")
    with pytest.raises(ValueError, match="min_ndim"):
        P.excluding("a", min_ndim=-1)


def test_describe_lists_every_leaf_with_reason_and_totals():
    params = {
        "Conv_0": {"kernel": np.ones((3, 3, 4, 8), np.float32), "bias": np.zeros(8, np.float32)},
        "pos_embed": np.ones((16, 8), np.float32),
        "step": np.zeros((2, 2), np.int32),
        "DenseGeneral_0": {"kernel": np.ones((8, 2, 4), np.float32)},
    }
    table = sparsejax.describe(params, m=3)
    lines = table.splitlines()
    assert len(lines) == 1 + 5 + 1  # header, one line per leaf, totals
    row = {ln.split()[0]: ln for ln in lines[1:-1]}
    assert "ndim 1 < 2" in row["Conv_0/bias"]
    assert "int32 dtype is not floating point" in row["step"]
    assert "component 'pos_embed' excluded" in row["pos_embed"]
    assert " yes " in row["Conv_0/kernel"] and "(2,) Cin of conv, size 4" in row["Conv_0/kernel"]
    assert "m=3 does not divide it" in row["Conv_0/kernel"]
    assert "unknown: pass axis=" in row["DenseGeneral_0/kernel"]
    assert lines[-1] == "prunable: 2 of 5 leaves, 352 of 492 entries (71.5%)"
    custom = sparsejax.describe(params, lambda p, x: np.ndim(x) == 1, axes=False)
    assert "custom predicate" in custom and "1 of 5 leaves, 8 of 492" in custom


def test_doctests():
    assert doctest.testmod(P).failed == 0


def test_integer_leaf_is_never_masked_by_sparsify():
    params = {
        "Dense_0": {"kernel": jnp.arange(64.0).reshape(8, 8) + 1.0},
        "counts": jnp.arange(1, 65, dtype=jnp.int32).reshape(8, 8),  # would be pruned before
    }
    tx = sparsejax.sparsify(optax.sgd(0.1), sparsejax.methods.static(0.5, score="magnitude"))
    state = tx.init(params)
    masks = sparsejax.masks_of(state)
    assert masks["counts"].shape == () and bool(masks["counts"])
    assert int(masks["Dense_0"]["kernel"].sum()) == 32
    pruned = sparsejax.prune(params, state)
    np.testing.assert_array_equal(pruned["counts"], params["counts"])
    assert pruned["counts"].dtype == jnp.int32


def test_vit_learned_tokens_are_untouched_by_static_pruning():
    """A ViT's class token (1, 1, D) and register tokens (R, D) are learned tables, not weight
    matrices: the default keeps them dense under static(0.8), and describe says why."""
    d = 8
    rng = np.random.default_rng(0)
    params = {
        "cls_token": jnp.asarray(rng.normal(size=(1, 1, d)), jnp.float32),
        "register_tokens": jnp.asarray(rng.normal(size=(4, d)), jnp.float32),
        "encoder": {"block_0": {"mlp": {"kernel": jnp.asarray(rng.normal(size=(d, 4 * d)),
                                                              jnp.float32)}}},
        "cls_head": {"kernel": jnp.asarray(rng.normal(size=(d, 10)), jnp.float32)},
    }
    tx = sparsejax.sparsify(optax.sgd(0.1), sparsejax.methods.static(
        0.8, score="magnitude", allocation="uniform"))
    state = tx.init(params)
    pruned = sparsejax.prune(params, state)
    for name in ("cls_token", "register_tokens"):
        np.testing.assert_array_equal(np.asarray(pruned[name]), np.asarray(params[name]))
        assert np.ndim(sparsejax.masks_of(state)[name]) == 0  # scalar True: not prunable
    kernel = np.asarray(pruned["encoder"]["block_0"]["mlp"]["kernel"])
    assert int((kernel == 0).sum()) == round(0.8 * d * 4 * d)  # the matrix is pruned
    row = {ln.split()[0]: ln for ln in sparsejax.describe(params, axes=False).splitlines()[1:-1]}
    assert "component 'cls_token' excluded ('cls*': a learned token table)" in row["cls_token"]
    assert "('*token*': a learned token table)" in row["register_tokens"]
    assert " no " in row["cls_head/kernel"]  # cls* also names a class head: kept dense
    assert " yes " in row["encoder/block_0/mlp/kernel"]
