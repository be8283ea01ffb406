"""The state readers on Flax NNX objects (``nnx.Optimizer`` state, ``nnx.State`` params) and
``optax.contrib.sam`` around ``sparsify`` (issue 24, item 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
from sparsejax import methods, schedules


class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def _top_half(w: np.ndarray) -> np.ndarray:
    """Magnitude mask keeping the larger half of ``|w|`` (no ties in random floats)."""
    flat = np.abs(w).ravel()
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[: flat.size - flat.size // 2]] = True
    return keep.reshape(w.shape)


@pytest.mark.parametrize("packed", [False, True])
def test_readers_take_nnx_optimizer_state_and_nnx_state_params(packed):
    model = MLP(rngs=nnx.Rngs(0))
    w1, w2 = np.asarray(model.l1.kernel[...]), np.asarray(model.l2.kernel[...])
    tx = sparsejax.sparsify(optax.adam(1e-2), methods.static(
        0.5, score="magnitude", allocation="uniform"), packed_masks=packed)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)

    masks = sparsejax.masks_of(opt.opt_state)  # plain nested dicts of bool arrays
    assert set(masks) == {"l1", "l2"} and masks["l1"]["kernel"].dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(masks["l1"]["kernel"]), _top_half(w1))
    np.testing.assert_array_equal(np.asarray(masks["l2"]["kernel"]), _top_half(w2))
    assert np.ndim(masks["l1"]["bias"]) == 0

    # before pruning every pruned weight is non-zero: check counts all of them
    counts = sparsejax.check(params, opt.opt_state)
    assert {k: int(v["kernel"]) for k, v in counts.items()} == {"l1": 64, "l2": 32}
    stats = sparsejax.sparsity_stats(opt.opt_state, params)
    assert (stats.n_params, stats.n_prunable) == (8 * 16 + 16 + 16 * 4 + 4, 192)
    assert float(stats.sparsity) == 0.5 and int(stats.n_active) == 212 - 96

    x = np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(3, 8)
    b1, b2 = np.asarray(model.l1.bias[...]), np.asarray(model.l2.bias[...])
    expected = np.maximum(x @ (w1 * _top_half(w1)) + b1, 0) @ (w2 * _top_half(w2)) + b2
    # forward_params: an nnx.State of Params, for nnx.merge
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    fp = sparsejax.forward_params(params, opt.opt_state)
    assert isinstance(fp, nnx.State) and isinstance(fp["l1"]["kernel"], nnx.Param)
    np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, fp, rest)(x)), expected,
                               rtol=1e-5, atol=1e-6)
    # prune: an nnx.State the model takes with nnx.update; the input state is left alone
    pruned = sparsejax.prune(params, opt.opt_state)
    assert isinstance(pruned, nnx.State)
    np.testing.assert_array_equal(np.asarray(params["l1"]["kernel"][...]), w1)
    nnx.update(model, pruned)
    np.testing.assert_array_equal(np.asarray(model.l1.kernel[...]), w1 * _top_half(w1))
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-6)

    @nnx.jit
    def train_step(model, opt, x):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        opt.update(model, grads)

    for _ in range(2):
        train_step(model, opt, jnp.asarray(x))
    after = nnx.state(model, nnx.Param)
    assert all(int(v["kernel"]) == 0 for v in sparsejax.check(after, opt.opt_state).values())
    assert not np.array_equal(np.asarray(model.l1.kernel[...]), w1 * _top_half(w1))  # trained


@pytest.mark.parametrize("packed", [False, True])
def test_sam_around_sparsify_traces_and_keeps_exact_zeros(packed):
    """optax.contrib.sam blends its inner state arithmetically (cond * a + (1 - cond) * b),
    which turned bool masks into int32 and made sparsify's lax.cond refuse its branches. Now
    it traces, and at every SAM sync step the params are exactly sparse."""
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                    "bias": jnp.zeros(6)}}
    schedule = schedules.polynomial(0.5, 0, 4, update_every=1)
    tx = optax.contrib.sam(
        sparsejax.sparsify(optax.adam(1e-2), methods.gradual(schedule), packed_masks=packed),
        optax.sgd(0.05), sync_period=2)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: jnp.sum(jnp.tanh(q["a"]["kernel"]) ** 2)
                     + jnp.sum(q["a"]["bias"]))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(8):
        params, state = step(params, state)
        if i % 2 == 1:  # a sync step: the inner sparsify update is applied
            n_inner = (i + 1) // 2  # inner updates so far; the latest ran at inner step n - 1
            mask = np.asarray(sparsejax.masks_of(state)["a"]["kernel"])
            assert mask.dtype == np.bool_
            kernel = np.asarray(params["a"]["kernel"])
            assert (kernel[~mask] == 0).all()
            zeros = int(np.round(np.float32(schedule(n_inner - 1)) * 48))
            assert int((~mask).sum()) == zeros and int((kernel == 0).sum()) == zeros
            assert int(sparsejax.check(params, state)["a"]["kernel"]) == 0
    assert int((~mask).sum()) == 24  # the schedule's end: 0.5 of 48
