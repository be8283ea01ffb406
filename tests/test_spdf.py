"""SPDF (Thangarasa et al. 2023): sparse until the switch step, dense after it; the revived
weights start at exactly 0 with zero optimizer moments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax import methods, schedules


def params0():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    return {"a": {"kernel": jax.random.normal(k1, (8, 16)), "bias": jnp.zeros(16)},
            "b": {"kernel": jax.random.normal(k2, (16, 4)), "bias": jnp.zeros(4)}}


def grads_at(p, i):
    return jax.tree_util.tree_map(lambda x: jnp.cos(x * (i + 1.0)) + 0.5, p)


@pytest.mark.parametrize("sparse", [
    methods.static(0.75, allocation="uniform"),
    methods.gradual(schedules.polynomial(0.75, 0, 2, update_every=1), allocation="uniform"),
])
def test_switch_to_dense_revives_from_zero_with_zero_moments(sparse):
    switch = 4
    b1 = 0.9
    tx = sparsejax.sparsify(optax.adam(1e-2, b1=b1), methods.spdf(sparse, switch))
    p = params0()
    state = tx.init(p)
    p = sparsejax.prune(p, state)
    step = jax.jit(lambda p, s, i: tx.update(grads_at(p, i), s, p))
    for i in range(switch):
        u, state = step(p, state, i)
        p = optax.apply_updates(p, u)
    pruned = ~np.asarray(sparsejax.masks_of(state)["a"]["kernel"])
    assert pruned.sum() == 96  # 0.75 of 128, uniform
    assert float(sparsejax.sparsity_stats(state, p).target_sparsity) == pytest.approx(0.75)
    assert not np.asarray(p["a"]["kernel"])[pruned].any()  # revived weights start at 0
    g = grads_at(p, switch)
    u, state = step(p, state, switch)  # the switch step
    assert np.asarray(sparsejax.masks_of(state)["a"]["kernel"]).all()
    mu = np.asarray(state.inner_state[0].mu["a"]["kernel"])
    # moments were zeroed where the mask changed: one Adam step from zero there
    np.testing.assert_allclose(mu[pruned], (1 - b1) * np.asarray(g["a"]["kernel"])[pruned],
                               rtol=1e-6)
    p = optax.apply_updates(p, u)
    assert np.asarray(p["a"]["kernel"])[pruned].all()  # they train now
    stats = sparsejax.sparsity_stats(state, p)
    assert float(stats.sparsity) == 0.0 and float(stats.target_sparsity) == 0.0
    assert int(stats.n_active) == stats.n_params


def test_cadence_is_the_sparse_steps_before_the_switch_plus_the_switch():
    sched = schedules.polynomial(0.5, 2, 8, update_every=3)  # updates at 2, 5, 8
    m = methods.spdf(methods.gradual(sched), 6)
    steps = np.arange(12)
    got = np.asarray(jax.vmap(m.cadence.is_update_step)(jnp.asarray(steps)))
    np.testing.assert_array_equal(np.flatnonzero(got), [2, 5, 6])
    m = methods.spdf(methods.static(0.5), 6)
    got = np.asarray(jax.vmap(m.cadence.is_update_step)(jnp.asarray(steps)))
    np.testing.assert_array_equal(np.flatnonzero(got), [6])
    assert float(m.target(5)) == pytest.approx(0.5) and float(m.target(6)) == 0.0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_switch_step(bad):
    with pytest.raises(ValueError, match="dense_from_step"):
        methods.spdf(methods.static(0.5), bad)


@pytest.mark.slow
def test_spdf_recipe_trains_and_accounts_for_the_switch(tmp_path):
    from conftest import tiny_config

    from sparsejax.run import experiment, rundir

    c = tiny_config(sparsity__method="static", sparsity__final=0.75, sparsity__score="random",
                    sparsity__allocation="erk", sparsity__dense_from=0.5)
    c.train.log_every = 1
    c.model.size = "1,32,2,64"  # one block: the point is the switch, not the model
    c.checkpoint.every = c.train.steps
    summary = experiment.run(c, str(tmp_path / "run"), progress=False)
    records = rundir.read_metrics(tmp_path / "run")
    sparsity = [r["sparsity"] for r in records]  # record k is after step k (1-based)
    assert all(abs(s - 0.75) < 1e-3 for s in sparsity[:4]) and not any(sparsity[4:])
    n = summary["n_params"]
    want = np.mean([r["n_active"] for r in records])  # N_avg over the 8 steps
    assert summary["n_avg"] == pytest.approx(want, rel=1e-6) and records[-1]["n_active"] == n
    assert records[-1]["train_loss"] < records[0]["train_loss"]
