"""Straight-through N:M methods against hand-worked values: SR-STE's gradient, MDGF's forward
and backward at a given step, SDGF's frame boundaries, STE's dense weights and hard phase."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax import methods

W = jnp.array([[0.5, -3.0], [-2.0, 0.1], [1.0, 0.4], [0.2, -0.3]])  # (in=4, out=2)
E = np.array([[False, True], [True, False], [True, True], [False, False]])  # 2:4 of |W|, by hand
G = jnp.array([[0.1, 0.2], [-0.3, 0.4], [0.5, -0.6], [0.7, 0.8]])


def params():
    return {"layer": {"kernel": W, "bias": jnp.zeros(2)}}


def one_step(method, lr=1.0, grads=None):
    tx = sparsejax.sparsify(optax.sgd(lr), method)
    p = params()
    state = tx.init(p)
    g = {"layer": {"kernel": G if grads is None else grads, "bias": jnp.zeros(2)}}
    u, state = jax.jit(tx.update)(g, state, p)
    return optax.apply_updates(p, u), state


def test_init_masks_are_nm_of_the_magnitudes_so_step_zero_is_already_sparse():
    state = sparsejax.sparsify(optax.sgd(1.0), methods.ste(2, 4)).init(params())
    np.testing.assert_array_equal(np.asarray(sparsejax.masks_of(state)["layer"]["kernel"]), E)


def test_ste_keeps_and_trains_every_weight():
    p, state = one_step(methods.ste(2, 4))
    np.testing.assert_allclose(p["layer"]["kernel"], W - G, rtol=1e-6)  # pruned ones too
    assert sum(int(v) for v in jax.tree_util.tree_leaves(sparsejax.check(p, state))) == 0
    fwd = sparsejax.forward_params(p, state)["layer"]["kernel"]
    m = np.asarray(sparsejax.masks_of(state)["layer"]["kernel"])
    np.testing.assert_array_equal(np.asarray(fwd) != 0, m)


def test_sr_ste_gradient_by_hand():
    decay = 0.1
    p, _ = one_step(methods.sr_ste(2, 4, decay=decay))
    refined = np.asarray(G) + decay * np.where(E, 0.0, np.asarray(W))  # g + decay (1 - E) W
    np.testing.assert_allclose(p["layer"]["kernel"], np.asarray(W) - refined, rtol=1e-6)


@pytest.mark.parametrize("kind, alpha, t, beta", [("linear", 0.25, 2, 0.5),
                                                  ("linear", 0.25, 7, 0.0),
                                                  ("exp", 0.5, 2, np.exp(-1.0))])
def test_mdgf_forward_and_backward_at_step_t(kind, alpha, t, beta):
    tx = sparsejax.sparsify(optax.sgd(0.0), methods.mdgf(2, 4, alpha=alpha, kind=kind))
    p = params()
    state = tx.init(p)
    update = jax.jit(tx.update)
    for _ in range(t):
        _, state = update(jax.tree.map(jnp.zeros_like, p), state, p)
    assert float(sparsejax.find_state(state).forward_weight) == pytest.approx(beta, rel=1e-6)
    fwd = sparsejax.forward_params(p, state)["layer"]["kernel"]
    np.testing.assert_allclose(fwd, np.asarray(W) * np.where(E, 1.0, beta), rtol=1e-6)
    c = jnp.arange(8.0).reshape(4, 2)
    grad = jax.grad(lambda q: jnp.sum(c * sparsejax.forward_params(q, state)["layer"]["kernel"]))(p)
    np.testing.assert_allclose(grad["layer"]["kernel"], c)  # straight-through: the identity


def test_sdgf_frame_boundaries():
    k = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
    p = {"w": {"kernel": k}}
    m = methods.sdgf([2, 4, 6], kind="stepwise", n=1, m=8)  # 4:8, 2:8, 1:8 after dense
    tx = sparsejax.sparsify(optax.sgd(0.0), m)
    state = tx.init(p)
    update = jax.jit(tx.update)
    kept = []
    for _ in range(8):
        _, state = update(jax.tree.map(jnp.zeros_like, p), state, p)
        mask = np.asarray(sparsejax.masks_of(state)["w"]["kernel"])
        kept.append(set(mask.reshape(2, 8, 3).sum(1).ravel().tolist()))
    assert kept == [{8}, {8}, {4}, {4}, {2}, {2}, {1}, {1}]  # steps 0..7
    assert [float(m.target(t)) for t in (1, 2, 4, 6)] == [0.0, 0.5, 0.75, 0.875]
    geo = methods.sdgf([0, 3], kind="geometric", n=2, m=4)  # 4:8 then 2:4
    state = sparsejax.sparsify(optax.sgd(0.0), geo).init(p)
    mask = np.asarray(sparsejax.masks_of(state)["w"]["kernel"]).reshape(2, 8, 3)
    assert (mask.sum(1) == 4).all()


def test_hard_phase_lands_pruned_weights_at_zero():
    tx = sparsejax.sparsify(optax.sgd(0.1), methods.sr_ste(2, 4, hard_from=3))
    p = params()
    state = tx.init(p)
    update = jax.jit(tx.update)
    for t in range(5):
        u, state = update({"layer": {"kernel": G, "bias": jnp.zeros(2)}}, state, p)
        p = optax.apply_updates(p, u)
        k = np.asarray(p["layer"]["kernel"])
        m = np.asarray(sparsejax.masks_of(state)["layer"]["kernel"])
        if t < 3:
            assert (k[~m] != 0).all()  # straight-through: pruned weights kept
        else:
            assert not k[~m].any() and (m.reshape(1, 4, 2).sum(1) == 2).all()
    assert sum(int(v) for v in jax.tree_util.tree_leaves(sparsejax.check(p, state))) == 0


@pytest.mark.parametrize("build, match", [
    (lambda: methods.sr_ste(2, 4, decay=-1.0), "decay"),
    (lambda: methods.mdgf(2, 4, alpha=0.0), "alpha"),
    (lambda: methods.mdgf(2, 4, alpha=0.1, kind="cosine"), "kind"),
    (lambda: methods.sdgf([3, 3]), "frames"),
    (lambda: methods.sdgf([1, 2], kind="odd"), "kind"),
    (lambda: methods.ste(2, 4, dense_steps=5, hard_from=5), "hard_from"),
])
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("kind, alpha, dense_steps, pruned_factor", [
    # beta_t = max(0, 1 - alpha (t - t_warm)) / exp(-alpha (t - t_warm)), t counted from the
    # end of the warm-up; the factor is what a pruned weight is multiplied by in the forward of
    # step t: 1 while the masks are dense (steps 0..t_warm: the masks step t reads were chosen
    # at step t - 1), then beta_t
    ("linear", 0.25, 3, [1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
    ("exp", 0.5, 2, [1.0, 1.0, 1.0, np.exp(-0.5), np.exp(-1.0), np.exp(-1.5)]),
])
def test_mdgf_beta_decays_from_the_end_of_the_dense_warm_up(kind, alpha, dense_steps,
                                                           pruned_factor):
    """MDGF with ``dense_steps > 0``: after the warm-up the state's ``forward_weight`` at step
    t is ``beta_t = max(0, 1 - alpha (t - t_warm))`` (or ``exp(-alpha (t - t_warm))``), and
    the forward weights are ``W`` during the warm-up, then ``W (E + (1 - E) beta_t)`` with the
    2:4 masks E: the first sparse step (t_warm + 1) already has ``beta = 1 - alpha``."""
    method = methods.mdgf(2, 4, alpha=alpha, kind=kind, dense_steps=dense_steps)
    tx = sparsejax.sparsify(optax.sgd(0.0), method)
    p = params()
    state = tx.init(p)
    update = jax.jit(tx.update)
    w = np.asarray(W, np.float64)
    for t, factor in enumerate(pruned_factor):
        if t > dense_steps:  # (during the warm-up no weight is pruned: beta is not used)
            assert float(sparsejax.find_state(state).forward_weight) == pytest.approx(
                factor, rel=1e-6, abs=1e-7), t
        mask = np.asarray(sparsejax.masks_of(state)["layer"]["kernel"])
        np.testing.assert_array_equal(mask, np.ones_like(E) if t <= dense_steps else E)
        fwd = np.asarray(sparsejax.forward_params(p, state)["layer"]["kernel"])
        np.testing.assert_allclose(fwd, w * np.where(E, 1.0, factor), rtol=1e-6, atol=1e-7,
                                   err_msg=f"step {t}")
        _, state = update(jax.tree.map(jnp.zeros_like, p), state, p)
