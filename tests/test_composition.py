"""The composition table (README, "Composition rules"): every way of combining ``sparsify``
with Optax either keeps ``params == params * mask`` after every step, or is refused with a
``ValueError`` that says how to compose instead.

Each case trains a small MLP for 6 steps with gradual pruning that changes the masks at steps
0, 2 and 4 and large gradients (so clipping and rescaling really act).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import sparsejax
from sparsejax import methods, schedules

STEPS = 6


def params0():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "l0": {"kernel": jax.random.normal(k1, (8, 16)), "bias": jnp.zeros(16)},
        "l1": {"kernel": jax.random.normal(k2, (16, 16)), "bias": jnp.zeros(16)},
        "l2": {"kernel": jax.random.normal(k3, (16, 4)), "bias": jnp.zeros(4)},
    }


def grads_at(params, step):
    return jax.tree_util.tree_map(lambda p: 10.0 * jnp.cos(p * (step + 1.0)) + 3.0, params)


def method():
    return methods.gradual(schedules.polynomial(0.75, 0, 4, update_every=2))


def sp(inner, **kw):
    return sparsejax.sparsify(inner, method(), **kw)


def labels(params):
    return {k: {"kernel": "sparse", "bias": "dense"} for k in params}


def kernels_only(params):
    return {k: {"kernel": True, "bias": False} for k in params}


def plateau():  # scales updates by 0.5 whenever the loss did not improve (here: always)
    return optax.contrib.reduce_on_plateau(factor=0.5, patience=0, cooldown=0, rtol=1e-4,
                                           atol=0.0, accumulation_size=1)


EXACT = {
    "chain(clip, sparsify(adam))": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                                       sp(optax.adam(1e-2))),
    "sparsify(chain(clip, adamw))": lambda: sp(optax.chain(optax.clip_by_global_norm(1.0),
                                                           optax.adamw(1e-2))),
    "multi_transform(sparsify(adam), sgd)": lambda: optax.multi_transform(
        {"sparse": sp(optax.adam(1e-2)), "dense": optax.sgd(1e-2)}, labels),
    "masked(sparsify(adam))": lambda: optax.masked(sp(optax.adam(1e-2)), kernels_only),
    "MultiSteps(sparsify(adam))": lambda: optax.MultiSteps(
        sp(optax.adam(1e-2)), every_k_schedule=2).gradient_transformation(),
    "sparsify(MultiSteps(adam))": lambda: sp(
        optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2).gradient_transformation()),
    "inject_hyperparams(sparsify(adam))": lambda: optax.inject_hyperparams(
        lambda learning_rate: sp(optax.adam(learning_rate)))(learning_rate=1e-2),
    "sparsify(inject_hyperparams(adamw))": lambda: sp(
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2)),
    "apply_if_finite(sparsify(adam))": lambda: optax.apply_if_finite(sp(optax.adam(1e-2)), 3),
    "sparsify(apply_if_finite(adam))": lambda: sp(optax.apply_if_finite(optax.adam(1e-2), 3)),
    "sparsify(schedule_free_adamw)": lambda: sp(optax.contrib.schedule_free_adamw(1e-2)),
    "sparsify(muon)": lambda: sp(optax.contrib.muon(1e-2)),
    "sparsify(chain(adam, reduce_on_plateau))": lambda: sp(optax.chain(optax.adam(1e-2),
                                                                       plateau())),
}

REFUSED = {
    "chain(sparsify(adamw), clip)": lambda **kw: optax.chain(sp(optax.adamw(1e-2), **kw),
                                                             optax.clip_by_global_norm(1.0)),
    "chain(sparsify(sgd), scale(0.5))": lambda **kw: optax.chain(sp(optax.sgd(1e-2), **kw),
                                                                 optax.scale(0.5)),
    "chain(sparsify(adam), reduce_on_plateau)": lambda **kw: optax.chain(
        sp(optax.adam(1e-2), **kw), plateau()),
    "lookahead(sparsify(adam))": lambda **kw: optax.lookahead(
        sp(optax.adam(1e-2), **kw), sync_period=2, slow_step_size=0.5),
    "named_chain(sparsify(adam), clip)": lambda **kw: optax.named_chain(
        ("sparse", sp(optax.adam(1e-2), **kw)), ("clip", optax.clip_by_global_norm(1.0))),
}


# The fast tier (pytest -m "not slow") runs one exact and one refused composition of each
# kind; the full suite runs every row of the README's table.
FAST = ("sparsify(chain(clip, adamw))", "chain(clip, sparsify(adam))",
        "chain(sparsify(adamw), clip)")


def cases(table):
    return [name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
            for name in sorted(table)]


def is_lookahead(name):
    return name.startswith("lookahead")


def make_step(tx, lookahead):
    @jax.jit
    def step(p, s, i):
        fast = p.fast if lookahead else p
        g = grads_at(fast, i)
        extra = {} if lookahead else {"value": jnp.float32(1.0) + i}  # loss never improves
        u, s = tx.update(g, s, p, **extra)
        return optax.apply_updates(p, u), s

    return step


def init(tx, lookahead):
    p = params0()
    p = optax.LookaheadParams.init_synced(p) if lookahead else p
    return p, tx.init(p)


@pytest.mark.parametrize("name", cases(EXACT))
def test_exact(name):
    tx = EXACT[name]()
    p, state = init(tx, False)
    p = sparsejax.prune(p, state)
    step = make_step(tx, False)
    changed = 0
    for i in range(STEPS):
        before = sparsejax.masks_of(state)
        p, state = step(p, state, i)
        masks = sparsejax.masks_of(state)
        changed += int(not np.array_equal(before["l1"]["kernel"], masks["l1"]["kernel"]))
        bad = sparsejax.check(p, state)
        assert sum(int(v) for v in jax.tree_util.tree_leaves(bad)) == 0, (name, i)
        k = np.asarray(p["l1"]["kernel"])
        np.testing.assert_array_equal(k, k * np.asarray(masks["l1"]["kernel"]))
    stats = sparsejax.sparsity_stats(state, p)
    assert changed >= 1 and float(stats.sparsity) > 0.3, name  # pruning really happened


@pytest.mark.parametrize("name", cases(REFUSED))
def test_refused_when_stepping(name):
    """With ``on_violation="raise"`` the update itself stops a user who never inspects the
    state (the default counts, and any read of the state raises: test_core_v2)."""
    lookahead = is_lookahead(name)
    tx = REFUSED[name](on_violation="raise")
    p, state = init(tx, lookahead)
    step = make_step(tx, lookahead)
    with pytest.raises(Exception, match="inside sparsify") as err:  # noqa: B017
        for i in range(STEPS):
            p, state = step(p, state, i)
            jax.block_until_ready(p)
    assert "were not 0 when update" in str(err.value)


@pytest.mark.parametrize("name", cases(REFUSED))
def test_refused_at_first_look_and_really_broken(name):
    """``prune``/``check`` refuse the state right after init; and the refusal is not
    over-cautious: counting instead of raising shows pruned weights that are not 0."""
    lookahead = is_lookahead(name)
    tx = REFUSED[name]()
    p, state = init(tx, lookahead)
    for fn in (sparsejax.prune, sparsejax.check):
        with pytest.raises(ValueError, match="inside sparsify"):
            fn(p.fast if lookahead else p, state)
    step = make_step(tx, lookahead)
    worst = 0
    for i in range(STEPS):
        p, state = step(p, state, i)
        fast = p.fast if lookahead else p
        masks = jax.tree_util.tree_leaves(
            jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(
                x, sparsejax.SparsifyState))[0][0][1].masks)
        leaves = jax.tree_util.tree_leaves(fast)
        worst = max(worst, sum(int(jnp.sum((x != 0) & ~m)) for x, m in zip(leaves, masks,
                                                                             strict=True)
                               if jnp.ndim(m)))
    assert worst > 0, name
