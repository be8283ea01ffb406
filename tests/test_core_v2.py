"""Core v2: declared cadences and targets, score/selection callables, ``methods.fixed``, one
source of truth for sparsity (``sparsity_stats``), ``prune`` at init, and the training loop's
exactness check."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
from sparsejax import masks, methods, schedules, scores
from sparsejax.errors import ExactnessError
from sparsejax.models.gpt import GPT, GPTConfig, loss_fn
from sparsejax.run import data, rundir, train
from sparsejax.run.build import Experiment
from sparsejax.run.spec import EvalSpec, RunSpec, TrainSpec


def mlp(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    return {
        "layers": {0: {"kernel": jax.random.normal(k[0], (8, 12)), "bias": jnp.zeros(12)},
                   1: {"kernel": jax.random.normal(k[1], (12, 4)), "bias": jnp.zeros(4)}},
        "norm": {"scale": jnp.ones(12)},
    }


def grads(p):
    return jax.tree_util.tree_map(lambda x: jnp.sin(3.0 * x) + 0.2, p)


def test_methods_exports():
    assert isinstance(methods.never, methods.Cadence) and methods.never.fixed
    assert methods.always.every_step and not methods.always.fixed
    assert methods.MaskMethod is sparsejax.methods.base.MaskMethod


@pytest.mark.parametrize("build, fixed, every", [
    (lambda: methods.static(0.5), True, False),
    (lambda: methods.gradual(schedules.constant(0.5)), False, True),
    (lambda: methods.gradual(schedules.constant(0.5, update_every=3)), False, False),
    (lambda: methods.gradual(schedules.polynomial(0.5, 2, 10, update_every=2)), False, False),
    (lambda: methods.nm(2, 4), False, True),
    (lambda: methods.nm(2, 4, update_every=5, begin_step=2), False, False),
    (lambda: methods.static(0.5, score="saliency"), False, False),
])
def test_declared_cadence_matches_update_steps(build, fixed, every):
    m = build()
    assert (m.cadence.fixed, m.cadence.every_step) == (fixed, every)
    steps = np.arange(40)
    got = np.asarray(jax.vmap(m.cadence.is_update_step)(jnp.asarray(steps)))
    if m.cadence.schedule is not None:  # following a schedule: exactly its update steps
        want = np.asarray(m.cadence.schedule.is_update_step(steps))
    elif fixed:
        want = np.zeros(40, bool)
    elif every:
        want = np.ones(40, bool)
    else:  # periodic: from begin_step every update_every, before end_step
        c = m.cadence
        want = (steps >= c.begin_step) & ((steps - c.begin_step) % c.update_every == 0)
        want &= steps < (c.end_step if c.end_step is not None else 10**9)
    np.testing.assert_array_equal(got, want)


def test_periodic_rejects_bad_values():
    with pytest.raises(ValueError, match="update_every"):
        methods.periodic(0)
    with pytest.raises(ValueError, match="end_step"):
        methods.periodic(1, 5, 5)


@pytest.mark.slow
def test_score_and_selection_callables():
    p = mlp()
    act = {"layers": {0: {"kernel": jnp.linspace(1.0, 2.0, 8), "bias": None},
                      1: {"kernel": jnp.ones(12), "bias": None}}, "norm": {"scale": None}}
    tx = sparsejax.sparsify(optax.sgd(0.1), methods.gradual(
        schedules.constant(0.5), score=scores.gblm_score(act), allocation="uniform"))
    state = tx.init(p)
    _, state = jax.jit(tx.update)(grads(p), state, p)
    w, g = np.asarray(p["layers"][0]["kernel"]), np.asarray(grads(p)["layers"][0]["kernel"])
    sc = np.abs(w) * (np.linspace(1.0, 2.0, 8)[:, None] + np.abs(g))  # GBLM by hand
    keep = np.zeros(sc.size, bool)
    keep[np.argsort(-sc.ravel(), kind="stable")[: sc.size // 2]] = True
    np.testing.assert_array_equal(
        np.asarray(sparsejax.masks_of(state)["layers"][0]["kernel"]).ravel(), keep)
    with pytest.raises(ValueError, match="gblm_score"):
        methods.gradual(schedules.constant(0.5), score=scores.gblm)
    # a selection callable: global top-k with per-leaf L2 normalisation
    sel = functools.partial(masks.global_topk, normalize="l2")
    m = methods.static(0.5, score="magnitude", allocation=sel)
    state = sparsejax.sparsify(optax.sgd(0.1), m).init(p)
    stats = sparsejax.sparsity_stats(state, p)
    assert int(stats.n_prunable) == 8 * 12 + 12 * 4
    assert int(stats.n_active) == stats.n_params - (8 * 12 + 12 * 4) // 2


def test_sparsity_stats_counts_by_hand():
    p = mlp()
    tx = sparsejax.sparsify(optax.adam(1e-2), methods.static(0.75, allocation="uniform"))
    state = tx.init(p)
    stats = jax.jit(sparsejax.sparsity_stats)(state, p)
    n_params = 8 * 12 + 12 + 12 * 4 + 4 + 12
    assert stats.n_params == n_params and stats.n_prunable == 144
    assert int(stats.n_active) == n_params - 72 - 36  # round(0.75 * 96), round(0.75 * 48)
    assert float(stats.sparsity) == pytest.approx(0.75)
    assert float(stats.target_sparsity) == pytest.approx(0.75)


def test_prune_gives_sparse_params_before_the_first_step():
    p = mlp()
    state = sparsejax.sparsify(optax.adam(1e-2), methods.static(0.5)).init(p)
    assert sum(int(v) for v in jax.tree_util.tree_leaves(sparsejax.check(p, state))) > 0
    pruned = sparsejax.prune(p, state)
    assert sum(int(v) for v in jax.tree_util.tree_leaves(sparsejax.check(pruned, state))) == 0
    np.testing.assert_array_equal(pruned["norm"]["scale"], p["norm"]["scale"])


def test_fixed_masks_from_a_checkpoint_with_string_keys():
    p = mlp()
    m0 = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(1), 0.3, (8, 12)))
    m1 = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(2), 0.6, (12, 4)))
    restored = {"layers": {"0": {"kernel": m0, "bias": True}, "1": {"kernel": m1, "bias": True}},
                "norm": {"scale": True}}  # orbax turns int dict keys into strings
    tx = sparsejax.sparsify(optax.adam(1e-2), methods.fixed(restored))
    state = tx.init(p)
    p = sparsejax.prune(p, state)
    update = jax.jit(tx.update)
    for _ in range(3):
        u, state = update(grads(p), state, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_array_equal(np.asarray(p["layers"][0]["kernel"]) != 0, m0)
    np.testing.assert_array_equal(np.asarray(p["layers"][1]["kernel"]) != 0, m1)
    assert float(sparsejax.sparsity_stats(state, p).target_sparsity) == pytest.approx(
        1 - (m0.sum() + m1.sum()) / (m0.size + m1.size))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["layers"]["1"].update(kernel=np.ones((4, 12), bool)), r"layers/1/kernel.*shape"),
    (lambda m: m["layers"].pop("1"), r"layers/1/kernel: no mask"),
    (lambda m: m["norm"].update(scale=np.zeros(12, bool)), r"norm/scale: not prunable"),
    (lambda m: m.update(extra={"kernel": True}), r"extra/kernel: mask for a leaf"),
])
def test_fixed_names_the_leaf_that_differs(edit, match):
    good = {"layers": {"0": {"kernel": np.ones((8, 12), bool), "bias": True},
                       "1": {"kernel": np.ones((12, 4), bool), "bias": True}},
            "norm": {"scale": True}}
    edit(good)
    with pytest.raises(ValueError, match=match):
        sparsejax.sparsify(optax.adam(1e-2), methods.fixed(good)).init(mlp())


# ------------------------------------------------------------------ the training loop

CFG = GPTConfig.from_variant("tiny", n_ctx=32, vocab_size=256)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    text = rng.integers(0, 256, 20_000, dtype=np.uint8)
    return data.Corpus(train=text[:16_000], val=text[16_000:], vocab_size=256, name="random")


@pytest.mark.slow
def test_static_run_never_sees_a_dense_forward(tmp_path, corpus):
    model = GPT(CFG, rngs=nnx.Rngs(0))
    tx = sparsejax.sparsify(optax.sgd(0.0), methods.static(0.9, score="magnitude"))
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    pruned = sparsejax.prune(params, tx.init(params))
    x, y = data.get_batch(corpus.train, seed=0, step=0, batch_size=4, seq_len=32)

    def loss_with(p):
        nnx.replace_by_pure_dict(params_state, p)
        m = nnx.merge(graphdef, params_state, rest)
        return float(loss_fn(m, jnp.asarray(x), jnp.asarray(y)))

    sparse_loss, dense_loss = loss_with(pruned), loss_with(params)
    assert abs(sparse_loss - dense_loss) > 1e-3  # the two forwards differ at 90% sparsity
    train.run(_spec(steps=1, log_every=1, every=1), Experiment(GPT(CFG, rngs=nnx.Rngs(0)), tx,
              corpus), tmp_path / "run", progress=False)
    first = rundir.read_metrics(tmp_path / "run")[0]
    assert first["train_loss"] == pytest.approx(sparse_loss, rel=1e-5)
    assert first["sparsity"] == pytest.approx(0.9, abs=1e-3) and first["target_sparsity"] == (
        pytest.approx(0.9))


def _spec(*, steps: int, log_every: int, every: int) -> RunSpec:
    """A hand-built run's spec: batches of 4 x 32 tokens, one eval batch."""
    return RunSpec(train=TrainSpec(steps=steps, batch_size=4, seq_len=32, log_every=log_every,
                                   warmup_steps=0),
                   eval=EvalSpec(every=every, batches=1, batch_size=4, final_batches=1))


class _ScaledState(tuple):
    """A user-written wrapper's state: not a plain tuple, so the state check cannot see it."""


def scaled(inner, factor):
    def init(params):
        return _ScaledState((inner.init(params),))

    def update(updates, state, params=None):
        u, s = inner.update(updates, state[0], params)
        return jax.tree_util.tree_map(lambda x: factor * x, u), _ScaledState((s,))

    return optax.GradientTransformation(init, update)


jax.tree_util.register_pytree_node(_ScaledState, lambda s: (tuple(s), None),
                                   lambda _, c: _ScaledState(c))


@pytest.mark.slow
def test_training_loop_fails_when_zeros_break(tmp_path, corpus):
    method = methods.gradual(schedules.polynomial(0.5, 0, 4, update_every=1))
    tx = scaled(sparsejax.sparsify(optax.adam(1e-2), method), 0.5)
    with pytest.raises(ExactnessError, match=r"pruned weights are not 0 \(.*kernel"):
        train.run(_spec(steps=6, log_every=2, every=6), Experiment(GPT(CFG, rngs=nnx.Rngs(0)),
                  tx, corpus), tmp_path / "run", progress=False)
    assert rundir.read_json(tmp_path / "run" / "summary.json")["status"] == "failed"


def test_training_loop_refuses_a_known_bad_composition(tmp_path, corpus):
    tx = optax.chain(sparsejax.sparsify(optax.adam(1e-2), methods.static(0.5)),
                     optax.clip_by_global_norm(1.0))
    with pytest.raises(ValueError, match="inside sparsify"):
        train.run(_spec(steps=2, log_every=10, every=100), Experiment(
            GPT(CFG, rngs=nnx.Rngs(0)), tx, corpus), tmp_path / "run", progress=False)


def test_reading_the_state_raises_after_the_zeros_broke():
    """A composition the state check cannot see (a user's own wrapper) is caught by the
    update's sample, and any read of the state then refuses."""
    p = mlp()
    method = methods.gradual(schedules.polynomial(0.5, 0, 4, update_every=1))
    tx = scaled(sparsejax.sparsify(optax.adam(1e-2), method), 0.5)
    state = tx.init(p)
    sparsejax.masks_of(state)  # fine before any update
    update = jax.jit(tx.update)
    for _ in range(3):
        u, state = update(grads(p), state, p)
        p = optax.apply_updates(p, u)
    for read in (sparsejax.masks_of, lambda s: sparsejax.prune(p, s)):
        with pytest.raises(ValueError, match="were not 0 when update 2 began"):
            read(state)
