"""BSRLinear / NMLinear against nnx.Linear holding the equivalent masked dense kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import BlockLayout, BSRLinear, NMLinear, bsr_linear_factory, nm_linear_factory


def dense_twin(layer, kernel, bias) -> nnx.Linear:
    lin = nnx.Linear(kernel.shape[0], kernel.shape[1], use_bias=bias is not None, rngs=nnx.Rngs(0))
    lin.kernel[...] = jnp.asarray(kernel)
    if bias is not None:
        lin.bias[...] = jnp.asarray(bias)
    return lin


def test_bsr_linear_forward_and_grads_match_masked_dense():
    rng = np.random.default_rng(0)
    mask = rng.random((4, 3)) < 0.5
    kernel = rng.standard_normal((64, 48)).astype(np.float32) * np.kron(mask, np.ones((16, 16)))
    bias = rng.standard_normal(48).astype(np.float32)
    sparse = BSRLinear.from_dense(kernel, bias, block=(16, 16), backend="cpu")
    dense = dense_twin(sparse, kernel, bias)
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    np.testing.assert_allclose(sparse(x), dense(x), atol=1e-5)

    def loss(model):
        return jnp.sum(jnp.sin(model(x)))

    gs, gd = nnx.grad(loss)(sparse), nnx.grad(loss)(dense)
    gk = np.asarray(gd["kernel"][...]).reshape(4, 16, 3, 16).transpose(0, 2, 1, 3)
    lay = sparse.layout.get_value()
    np.testing.assert_allclose(gs["values"][...], gk[lay.rows, lay.cols], atol=1e-5)
    np.testing.assert_allclose(gs["bias"][...], gd["bias"][...], atol=1e-5)
    assert set(nnx.state(sparse, nnx.Param).keys()) == {"values", "bias"}
    assert "layout" in nnx.state(sparse, BlockLayout)


def test_static_mask_training_step_updates_kept_blocks_only():
    factory = bsr_linear_factory((16, 16), 0.5, backend="cpu")
    layer = factory(32, 64, use_bias=True, rngs=nnx.Rngs(3))
    mask = layer.layout.get_value().mask()
    assert mask.sum() == 4  # round(0.5 * 8)
    x = jnp.ones((4, 32))

    @nnx.jit
    def step(model):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))

    before = np.asarray(layer.sparse_kernel().to_dense())
    step(layer)
    after = np.asarray(layer.sparse_kernel().to_dense())
    changed = np.abs(after - before).reshape(2, 16, 4, 16).max(axis=(1, 3)) > 0
    assert np.all(changed <= mask) and changed.any()


def test_factory_contract_and_mask_fn():
    def diagonal(nk, nn, key):
        return np.eye(nk, nn, dtype=bool)

    layer = bsr_linear_factory((8, 8), diagonal, backend="cpu")(
        32, 32, use_bias=False, rngs=nnx.Rngs(0)
    )
    assert layer.bias is None
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 32)), jnp.float32)
    w = np.asarray(layer.sparse_kernel().to_dense())
    assert layer(x).shape == (3, 2, 32)
    np.testing.assert_allclose(layer(x), np.asarray(x) @ w, atol=1e-5)
    assert np.count_nonzero(w.reshape(4, 8, 4, 8).any(axis=(1, 3))) == 4
    with pytest.raises(ValueError, match="not divisible by block"):
        bsr_linear_factory((8, 8), 0.5)(30, 32, use_bias=False, rngs=nnx.Rngs(0))


def test_nm_linear_matches_masked_dense_and_factory_is_2_4():
    layer = nm_linear_factory(2, 4, backend="cpu")(64, 24, use_bias=True, rngs=nnx.Rngs(0))
    kernel = np.asarray(layer.sparse_kernel().to_dense())
    assert ((kernel.reshape(16, 4, 24) != 0).sum(axis=1) <= 2).all()
    bias = np.random.default_rng(0).standard_normal(24).astype(np.float32)
    layer = NMLinear.from_dense(kernel, bias, n=2, m=4, backend="cpu")
    dense = dense_twin(layer, kernel, bias)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 64)), jnp.float32)
    np.testing.assert_allclose(layer(x), dense(x), atol=1e-5)
    gs = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    gd = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(dense)
    # kept entries' gradients equal the dense kernel gradient at those positions
    gk = np.asarray(gd["kernel"][...]).reshape(16, 4, 24)
    idx = np.asarray(layer.sparse_kernel().indices())  # (2, 16, 24)
    expected = np.concatenate([np.take_along_axis(gk, i[:, None, :], 1)[:, 0] for i in idx])
    np.testing.assert_allclose(gs["values"][...], expected, atol=1e-4)
    assert nnx.jit(lambda m, x: m(x))(layer, x).shape == (5, 24)
