"""A Flax linen CNN with BatchNorm (HWIO conv kernels, batch_stats collection) trained 5 steps
with ``sparsify(optax.adam, method)`` for static ERK, gradual global and 2:4 (default axis):
exact kept counts per leaf, N:M groups along ``Cin``, batch_stats updating normally, and
``params == params * mask`` after every step. The 5-step trainings (one module fixture) are
marked slow."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import sparsejax
from sparsejax import allocation, methods, schedules
from sparsejax.prunable import path_str, prunable_tree

STEPS = 5
PRUNABLE = ("Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel")


class CNN(nn.Module):
    """Conv -> BatchNorm -> relu -> Conv (stride 2) -> BatchNorm -> relu -> pool -> Dense."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x)))
        x = nn.Conv(32, (3, 3), strides=2)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


METHODS = {
    "static_erk": lambda: methods.static(0.8, allocation="erk"),
    "gradual_global": lambda: methods.gradual(schedules.constant(0.5), allocation="global"),
    "nm_2_4": lambda: methods.nm(2, 4),
}


MODEL = CNN()
# numpy data: a module-level jax.random call compiles at collection, in every xdist worker
_RNG = np.random.default_rng(0)
X = _RNG.standard_normal((8, 8, 8, 4)).astype(np.float32)  # 4 input channels: 2:4 along Cin fits
Y = _RNG.integers(0, 10, (8,)).astype(np.int32)
KP = jax.random.key(0)


def loss_fn(params, stats):
    logits, new = MODEL.apply({"params": params, "batch_stats": stats}, X, train=True,
                              mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean(), new["batch_stats"]


# Shared by all methods (compiled once): a plain BatchNorm update from given params.
expected_stats = jax.jit(lambda params, stats: loss_fn(params, stats)[1])


def train(method, variables):
    params, stats = variables["params"], variables["batch_stats"]
    tx = sparsejax.sparsify(optax.adam(1e-2), method)
    opt_state = jax.jit(tx.init)(params)
    params = sparsejax.prune(params, opt_state)

    @jax.jit
    def step(p, s, o):
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), new, o, loss

    history = []
    for _ in range(STEPS):
        want = expected_stats(params, stats)
        params, stats, opt_state, loss = step(params, stats, opt_state)
        history.append({
            "params": params, "masks": sparsejax.masks_of(opt_state), "stats": stats,
            "want_stats": want, "loss": float(loss),
        })
    return variables, history


@pytest.fixture(scope="module")
def runs():
    variables = jax.jit(lambda k: MODEL.init(k, X, train=False))(KP)
    return {name: train(make(), variables) for name, make in METHODS.items()}


def named(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_zeros_exact_after_every_step_and_only_kernels_masked(runs, name):
    variables, history = runs[name]
    assert {path_str(p) for p, f in jax.tree_util.tree_flatten_with_path(
        prunable_tree(variables["params"]))[0] if f} == set(PRUNABLE)
    for rec in history:
        params, masks = named(rec["params"]), named(rec["masks"])
        for leaf, mask in masks.items():
            if leaf in PRUNABLE:
                assert mask.shape == params[leaf].shape and mask.dtype == bool
                np.testing.assert_array_equal(params[leaf], params[leaf] * mask)
            else:
                assert mask.shape == () and bool(mask)  # biases, BatchNorm scale/bias
        assert sum(masks[leaf].sum() for leaf in PRUNABLE) < sum(
            masks[leaf].size for leaf in PRUNABLE)
        assert np.isfinite(rec["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_batch_stats_update_normally(runs, name):
    variables, history = runs[name]
    previous = named(variables["batch_stats"])
    for rec in history:
        got, want = named(rec["stats"]), named(rec["want_stats"])
        assert set(got) == {"BatchNorm_0/mean", "BatchNorm_0/var", "BatchNorm_1/mean",
                            "BatchNorm_1/var"}
        for leaf in got:
            np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-6, atol=1e-7)
            assert not np.array_equal(got[leaf], previous[leaf]), leaf  # they do move
            assert np.all(got[leaf] != 0.0), leaf  # no entry masked to zero
        previous = got


@pytest.mark.slow
def test_static_erk_exact_counts_per_leaf(runs):
    variables, history = runs["static_erk"]
    params = variables["params"]
    sparsities = named(allocation.erk(params, 0.8))
    first = named(history[0]["masks"])
    total = pruned = 0
    for leaf in PRUNABLE:
        n = first[leaf].size
        want_kept = n - int(np.round(np.float32(sparsities[leaf]) * np.float32(n)))
        total, pruned = total + n, pruned + n - want_kept
        for rec in history:  # fixed: the same mask at every step
            mask = named(rec["masks"])[leaf]
            assert int(mask.sum()) == want_kept, leaf
            np.testing.assert_array_equal(mask, first[leaf])
    assert abs(pruned / total - 0.8) < 0.01


@pytest.mark.slow
def test_gradual_global_exact_total(runs):
    variables, history = runs["gradual_global"]
    n = sum(int(np.size(named(variables["params"])[leaf])) for leaf in PRUNABLE)
    for rec in history:
        masks = named(rec["masks"])
        kept = sum(int(masks[leaf].sum()) for leaf in PRUNABLE)
        assert kept == n - int(np.round(np.float32(0.5) * n))
        assert all(0 < masks[leaf].sum() for leaf in PRUNABLE)


@pytest.mark.slow
def test_nm_2_4_groups_lie_along_cin(runs):
    _, history = runs["nm_2_4"]
    for rec in history:
        masks = named(rec["masks"])
        for leaf in ("Conv_0/kernel", "Conv_1/kernel"):
            h, w, cin, cout = masks[leaf].shape
            groups = masks[leaf].reshape(h, w, cin // 4, 4, cout)
            assert (groups.sum(axis=3) == 2).all(), leaf  # 2 of every 4 input channels
        dense = masks["Dense_0/kernel"]  # (in=32, out=10): along the input axis
        assert (dense.reshape(8, 4, 10).sum(axis=1) == 2).all()
    # Another axis would not give 2:4 along Cin: the check above can fail.
    conv = named(history[-1]["masks"])["Conv_1/kernel"]
    assert not (conv.reshape(3, 3, 16, 8, 4).sum(axis=-1) == 2).all()


def test_nm_default_axis_refuses_rgb_input_or_skips_it():
    init = jax.jit(lambda k: CNN().init(k, jnp.ones((1, 8, 8, 3)), train=False))
    params = init(jax.random.key(0))["params"]
    with pytest.raises(ValueError, match="Conv_0/kernel"):
        sparsejax.sparsify(optax.adam(1e-2), methods.nm(2, 4)).init(params)
    tx = sparsejax.sparsify(optax.adam(1e-2), methods.nm(2, 4, skip_indivisible=True))
    with pytest.warns(UserWarning, match="Conv_0/kernel"):
        tx.init(params)
