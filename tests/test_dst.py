"""SET (Mocanu et al. 2018) and RigL (Evci et al. 2020): hand-worked updates and invariants."""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import allocation, masks, methods, sparsify
from sparsejax.methods import dst

MATRIX = lambda path, leaf: jnp.ndim(leaf) >= 2  # noqa: E731 - prunable: the 2-D leaves


# --- hand-worked 4x4 case ----------------------------------------------------------------------
# Active (flat indices) 0, 2, 5, 7, 8, 10, 13, 15 with |w| .9 .1 .5 .05 .7 .3 .1 .8.
# f0 = 0.5, end_step = 8, t = 4: f_t = 0.5 * (1 + cos(pi/2)) / 2 = 0.25 in exact arithmetic, but
# cos(pi/2) is -4.4e-8 in float32, so f_t * 8 = 1.9999999: rounding="round" replaces k = 2,
# rounding="floor" (the reference's truncation, the default) k = 1.
# round: drop the two smallest active |w|: index 7 (.05), then the tie .1 of 2 and 13: the lower
# index (2) is kept, so 13 is dropped. Kept: {0, 2, 5, 8, 10, 15}.
# floor: drop only index 7. Kept: {0, 2, 5, 8, 10, 13, 15}.
ACTIVE = [0, 2, 5, 7, 8, 10, 13, 15]
W = np.zeros(16, np.float32)
W[ACTIVE] = [0.9, -0.1, 0.5, 0.05, -0.7, 0.3, 0.1, 0.8]
MASK = np.zeros(16, bool)
MASK[ACTIVE] = True
KEPT = {0, 2, 5, 8, 10, 15}


def _one_update(method, grads, key, w=W, mask=MASK, step=4):
    params = {"w": jnp.asarray(w.reshape(4, 4))}
    new, _ = jax.jit(method.update, static_argnums=6)(
        params, {"w": jnp.asarray(grads.reshape(4, 4))}, {"w": jnp.asarray(mask.reshape(4, 4))},
        (), jnp.int32(step), key, MATRIX,
    )
    return set(np.flatnonzero(np.asarray(new["w"]).ravel()).tolist())


def _reference_rigl(mask, w, g, f0, t, end_step):
    """google-research/rigl's SparseRigLOptimizer.generic_mask_update in float32 numpy: TF's
    cosine_decay, n_prune = int32(float32(n_ones) * drop_fraction), keep the n_ones - n_prune
    largest |mask * w|, grow the n_prune largest |g| outside the kept set (stable top-k)."""
    f32 = np.float32
    c = f32(min(t, end_step)) / f32(end_step)
    fraction = f32(f0) * (f32(0.5) * (f32(1.0) + np.cos(f32(np.pi) * c)))
    n_ones = int(mask.sum())
    n_prune = int(f32(n_ones) * fraction)
    drop_order = np.argsort(-np.abs(mask * w), kind="stable")
    kept = np.zeros_like(mask)
    kept[drop_order[:n_ones - n_prune]] = True
    grow = np.abs(g)
    lifted = np.where(kept, grow.min() - 1, grow)
    grown = np.argsort(-lifted, kind="stable")[:n_prune]
    new = kept.copy()
    new[grown] = True
    return set(np.flatnonzero(new).tolist())


def test_rigl_hand_worked_4x4():
    method = methods.rigl(0.5, update_every=4, end_step=8, drop_fraction=0.5, rounding="round")
    g = np.full(16, 0.01, np.float32)
    g[[0, 5, 15]] = 10.0  # kept weights: not candidates, whatever their gradient
    g[4], g[11] = -3.0, 3.0  # tie in |g|: the lower index (4) wins
    g[13] = 0.5
    # Candidates: every weight outside KEPT (13 and 7, just dropped, included). Top-2 |g|: 4, 11.
    assert _one_update(method, g, jax.random.PRNGKey(0)) == KEPT | {4, 11}
    # The default, rounding="floor": k = 1, only 7 dropped; 13 kept; the grow picks 4. That is
    # what the reference computes (TF's top_k also keeps the lower index of a tie).
    default = methods.rigl(0.5, update_every=4, end_step=8, drop_fraction=0.5)
    assert _one_update(default, g, jax.random.PRNGKey(0)) == KEPT | {13, 4}
    assert _reference_rigl(MASK, W, g, 0.5, 4, 8) == KEPT | {13, 4}
    # RigL reference: a just-dropped weight with a large gradient is grown again (stays active).
    g[13] = 5.0
    assert _one_update(method, g, jax.random.PRNGKey(0)) == KEPT | {13, 4}
    # f0 = 0.25: k = round(0.125 * 8) = 1: only index 7 is dropped, 13 stays kept (so it is no
    # candidate), and the grow picks 4 (|g| 3, tied with 11, lower index).
    small = methods.rigl(0.5, update_every=4, end_step=8, drop_fraction=0.25, rounding="round")
    assert _one_update(small, g, jax.random.PRNGKey(0)) == KEPT | {13, 4}
    # rounding="floor" (the default): float32 f_t * 8 = 0.99999994 -> k = 0.
    floor = methods.rigl(0.5, update_every=4, end_step=8, drop_fraction=0.25)
    assert _one_update(floor, g, jax.random.PRNGKey(0)) == set(ACTIVE)


def test_rigl_default_is_the_reference_where_round_and_floor_differ():
    """Hand-built updates (no ties) where the reference's truncation and round-half-to-even
    give different drop counts: the default matches the reference, rounding="round" does not."""
    w = W.copy()
    w[ACTIVE] = [0.9, -0.15, 0.5, 0.05, -0.7, 0.3, 0.1, 0.8]  # distinct |w|
    g = np.linspace(0.1, 1.6, 16, dtype=np.float32)[::-1].copy()  # distinct |g|, largest first
    g[ACTIVE] *= 0.01  # a dropped weight is never grown again: the counts show in the masks
    # through drop_and_grow (what rigl's update calls; test_rigl_hand_worked_4x4 runs rigl's
    # default itself), one compile per rounding

    @functools.partial(jax.jit, static_argnames="rounding")
    def update(fraction, rounding="floor"):
        new = dst.drop_and_grow({"w": jnp.asarray(w)}, {"w": jnp.asarray(MASK)},
                                {"w": jnp.abs(jnp.asarray(g))}, fraction, {"w": True},
                                rounding=rounding)
        return new["w"]

    # f_t * 8: 1.9999999, 2.7314, 0.99999994 (float32)
    for f0, t in [(0.5, 4), (0.4, 2), (0.25, 4)]:
        ref = _reference_rigl(MASK, w, g, f0, t, 8)
        fraction = dst.cosine_drop_fraction(jnp.int32(t), f0, 8)
        assert set(np.flatnonzero(np.asarray(update(fraction))).tolist()) == ref, (f0, t)
        rounded = update(fraction, rounding="round")
        assert set(np.flatnonzero(np.asarray(rounded)).tolist()) != ref, (f0, t)


def test_set_hand_worked_4x4():
    method = methods.set_(0.5, update_every=4, end_step=8, drop_fraction=0.5, rounding="round")
    key = jax.random.PRNGKey(7)
    # The uniform scores SET draws, derived here from the key: per leaf fold_in(key, crc32(path)).
    leaf_key = jax.random.fold_in(key, zlib.crc32(b"w") & 0x7FFFFFFF)
    u = np.asarray(jax.random.uniform(leaf_key, (4, 4), jnp.float32)).ravel()
    candidates = [i for i in range(16) if i not in KEPT]
    order = sorted(candidates, key=lambda i: (-u[i], i))
    expected = KEPT | set(order[:2])
    got = _one_update(method, np.zeros(16, np.float32), key)
    assert got == expected
    # SET ignores the gradient: the same key gives the same mask whatever the grads.
    assert _one_update(method, np.arange(16, dtype=np.float32), key) == expected
    # Another key draws other scores, and for this key pair another grow set.
    other = jax.random.PRNGKey(8)
    u2 = np.asarray(jax.random.uniform(
        jax.random.fold_in(other, zlib.crc32(b"w") & 0x7FFFFFFF), (4, 4))).ravel()
    expected2 = KEPT | set(sorted(candidates, key=lambda i: (-u2[i], i))[:2])
    assert expected2 != expected
    assert _one_update(method, np.zeros(16, np.float32), other) == expected2


def test_set_under_sparsify_grows_from_the_step_key():
    """Inside sparsify(seed=s), the update at step t uses fold_in(PRNGKey(s), t)."""
    method = methods.set_(0.5, update_every=2, end_step=6, drop_fraction=0.5,
                          allocation="uniform")
    tx = sparsify(optax.sgd(0.1), method, prunable=MATRIX, seed=5)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 8)), "b": jnp.ones(8)}
    state = tx.init(params)
    params = jax.tree_util.tree_map(lambda p, m: p * m, params, state.masks)
    update = jax.jit(tx.update)
    for _ in range(3):  # steps 0, 1, 2 (2 is the first update step)
        old_masks, before = state.masks, params
        grads = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 0.5), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    expected, _ = jax.jit(method.update, static_argnums=6)(
        before, grads, old_masks, (), jnp.int32(2), jax.random.fold_in(jax.random.PRNGKey(5), 2),
        MATRIX)
    assert not (np.asarray(expected["w"]) == np.asarray(old_masks["w"])).all()
    np.testing.assert_array_equal(np.asarray(state.masks["w"]), np.asarray(expected["w"]))
    assert np.asarray(state.masks["b"]).shape == () and bool(state.masks["b"])


def test_cosine_drop_fraction_by_hand():
    f = jax.jit(functools.partial(dst.cosine_drop_fraction, drop_fraction=0.3, end_step=8))
    # 0.3 * (1 + cos(pi t / 8)) / 2, worked by hand
    expected = {0: 0.3, 2: 0.15 * (1 + 0.7071067811865476), 4: 0.15,
                6: 0.15 * (1 - 0.7071067811865476), 8: 0.0, 12: 0.0}
    for t, v in expected.items():
        assert float(f(jnp.int32(t))) == pytest.approx(v, abs=1e-7), t


def test_update_steps_follow_rigl_algorithm_1():
    method = methods.rigl(0.5, update_every=3, end_step=10)
    due = [t for t in range(20) if bool(method.cadence.is_update_step(jnp.int32(t)))]
    assert due == [3, 6, 9]  # t % 3 == 0 and 0 < t < 10
    assert float(method.target(jnp.int32(5))) == pytest.approx(0.5)
    assert method.name == "rigl/erk"
    assert methods.set_(0.5, update_every=3, end_step=10, allocation="uniform").name == (
        "set/uniform")


@pytest.mark.parametrize("kwargs", [
    dict(update_every=0, end_step=10), dict(update_every=5, end_step=5),
    dict(update_every=2, end_step=10, drop_fraction=1.5),
    dict(update_every=2, end_step=10, allocation="nope"),
    dict(update_every=2, end_step=10, rounding="ceil"),
])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        methods.rigl(0.5, **kwargs)
    with pytest.raises(ValueError):
        methods.set_(1.0, update_every=2, end_step=10)


# --- initial allocation -----------------------------------------------------------------------
SHAPES = {"a": (16, 16), "b": (4, 32), "c": (64, 8), "c_bias": (8,)}


@pytest.mark.parametrize("alloc", ["uniform", "erk"])
def test_initial_per_layer_counts(alloc):
    params = {k: jnp.ones(s) for k, s in SHAPES.items()}
    sp = (allocation.erk if alloc == "erk" else allocation.uniform)(params, 0.8, prunable=MATRIX)
    make = methods.set_ if alloc == "uniform" else methods.rigl  # one init, shared by both
    m, _ = jax.jit(make(0.8, update_every=2, end_step=10, allocation=alloc).init,
                   static_argnums=2)(params, jax.random.PRNGKey(1), MATRIX)
    for k, s in SHAPES.items():
        if len(s) < 2:
            assert np.asarray(m[k]).shape == () and bool(m[k])
            continue
        n = math.prod(s)
        assert int(np.sum(m[k])) == int(masks.num_kept(n, sp[k])), (alloc, k)
    if alloc == "erk":  # ERK really differs from uniform here
        assert len({round(sp[k], 3) for k in ("a", "b", "c")}) > 1


# --- invariants over many steps ---------------------------------------------------------------
UPDATE_EVERY, END_STEP, STEPS = 3, 16, 24
TREE = {"dense1": {"kernel": (6, 8), "bias": (8,)}, "norm": {"scale": (8,)},
        "dense2": {"kernel": (8, 4), "bias": (4,)}}


def _init_params(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"dense1": {"kernel": jax.random.normal(k1, (6, 8)) * 0.5,
                       "bias": 0.1 + jax.random.uniform(k2, (8,))},
            "norm": {"scale": jnp.ones(8)},
            "dense2": {"kernel": jax.random.normal(k3, (8, 4)) * 0.5,
                       "bias": 0.1 + jax.random.uniform(k4, (4,))}}


def _loss(params, x, y):
    h = x @ params["dense1"]["kernel"] + params["dense1"]["bias"]
    h = h / jnp.sqrt(jnp.mean(h**2, -1, keepdims=True) + 1e-6) * params["norm"]["scale"]
    return jnp.mean((jnp.tanh(h) @ params["dense2"]["kernel"] + params["dense2"]["bias"] - y) ** 2)


def _adam_moments(inner_state):
    found = [s for s in jax.tree_util.tree_leaves(
        inner_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0].mu, found[0].nu


@functools.cache
def _runner(kind, alloc, sparsity, drop_fraction, inject):
    make = methods.rigl if kind == "rigl" else methods.set_
    method = make(sparsity, update_every=UPDATE_EVERY, end_step=END_STEP,
                  drop_fraction=drop_fraction, allocation=alloc)
    inner = (optax.inject_hyperparams(optax.adamw)(learning_rate=0.05, weight_decay=1e-3)
             if inject else optax.adam(0.05))
    tx = sparsify(inner, method, prunable=MATRIX)

    @jax.jit
    def run(seed):
        key = jax.random.PRNGKey(seed)
        params = _init_params(key)
        state = tx.init(params)
        init_masks, _ = method.init(params, jax.random.fold_in(key, 1), MATRIX)
        state = state._replace(masks=init_masks, key=jax.random.fold_in(key, 2))
        params = jax.tree_util.tree_map(lambda p, m: p * m, params, init_masks)
        x = jax.random.normal(jax.random.fold_in(key, 3), (STEPS, 16, 6))
        y = jax.random.normal(jax.random.fold_in(key, 4), (STEPS, 16, 4))

        def step(carry, batch):
            params, state = carry
            g = jax.grad(_loss)(params, *batch)
            updates, state = tx.update(g, state, params)
            new = optax.apply_updates(params, updates)
            mu, nu = _adam_moments(state.inner_state)
            return (new, state), dict(before=params, after=new, masks=state.masks, mu=mu, nu=nu)

        _, trace = jax.lax.scan(step, (params, state), (x, y))
        return init_masks, trace

    return run


# Both methods and both allocations run in the fast tier (-m "not slow"); the other two
# combinations in the full suite.
CONFIGS = [("set", "uniform", 0.5, 0.3, False), ("rigl", "erk", 0.8, 0.5, True),
           pytest.param(("rigl", "uniform", 0.7, 0.3, False), marks=pytest.mark.slow),
           pytest.param(("set", "erk", 0.6, 0.5, True), marks=pytest.mark.slow)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@settings(max_examples=30, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_invariants_over_many_steps(config, seed):
    init_masks, tr = jax.device_get(_runner(*config)(seed))
    is_update = [t % UPDATE_EVERY == 0 and 0 < t < END_STEP for t in range(STEPS)]
    changed_any = False
    for layer in ("dense1", "dense2"):
        m0 = init_masks[layer]["kernel"]
        masks_t = tr["masks"][layer]["kernel"]  # (STEPS, ...): the masks used at step t
        before, after = tr["before"][layer]["kernel"], tr["after"][layer]["kernel"]
        # exact per-layer counts at every step
        assert (masks_t.reshape(STEPS, -1).sum(1) == m0.sum()).all()
        # params == params * mask after every step; moments zero where inactive
        assert (after[~masks_t] == 0).all()
        assert (tr["mu"][layer]["kernel"][~masks_t] == 0).all()
        assert (tr["nu"][layer]["kernel"][~masks_t] == 0).all()
        prev = m0
        for t in range(STEPS):
            grown = masks_t[t] & ~prev
            if not is_update[t]:  # masks change only on update steps (never from end_step on)
                assert (masks_t[t] == prev).all(), t
            else:
                changed_any |= bool(grown.any())
                # a grown weight is exactly 0 when it is grown (it was pruned), and stays 0
                # with zero moments through that step (hold_grown, the reference semantics)
                assert (before[t][grown] == 0).all() and (after[t][grown] == 0).all()
                assert (tr["mu"][layer]["kernel"][t][grown] == 0).all()
            prev = masks_t[t]
    assert changed_any  # drop/grow happened before end_step
    # non-prunable leaves: scalar True masks, never zeroed
    for path in (("dense1", "bias"), ("norm", "scale"), ("dense2", "bias")):
        m = tr["masks"][path[0]][path[1]]
        assert m.shape == (STEPS,) and m.all()
        assert (tr["after"][path[0]][path[1]] != 0).all()


@pytest.mark.parametrize("hold_grown", [True, False])
def test_grown_weights_start_from_zero_with_fresh_moments(hold_grown):
    """At a grow step, a grown weight starts at exactly 0 with zero momentum. With hold_grown
    (the default, the reference's semantics) it is still exactly 0 with a zero trace after that
    step, and the next step gives it one fresh momentum-SGD step, -lr * g; with
    hold_grown=False it takes that fresh step at once. A dropped weight lands at exactly 0 with
    a zero trace."""
    method = methods.rigl(0.5, update_every=2, end_step=6, drop_fraction=0.5,
                          allocation="uniform", hold_grown=hold_grown)
    lr = 0.125
    tx = sparsify(optax.sgd(lr, momentum=0.9), method, prunable=MATRIX)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 8)), "b": jnp.ones(8)}
    state = tx.init(params)
    params = jax.tree_util.tree_map(lambda p, m: p * m, params, state.masks)
    grads = [{k: jax.random.normal(jax.random.PRNGKey(i), p.shape) for k, p in params.items()}
             for i in range(4)]
    update = jax.jit(tx.update)
    for t in range(3):  # steps 0, 1, 2 (2 is the first update step)
        old_masks = state.masks
        before = params
        updates, state = update(grads[t], state, params)
        params = optax.apply_updates(params, updates)
    old, new = np.asarray(old_masks["w"]), np.asarray(state.masks["w"])
    grown, dropped = new & ~old, old & ~new
    # floor(32 * f_2) with f_2 = 0.5 * (1 + cos(pi / 3)) / 2 = 0.375: 11 or 12 replaced (float32)
    assert grown.sum() == dropped.sum() > 0
    trace = np.asarray(state.inner_state[0].trace["w"])
    g = np.asarray(grads[2]["w"])
    assert (np.asarray(before["w"])[grown] == 0).all()
    if hold_grown:
        assert (np.asarray(params["w"])[grown] == 0).all() and (trace[grown] == 0).all()
        # step 3 (no mask update): the grown weights take their first step, from 0
        updates, state = update(grads[3], state, params)
        params = optax.apply_updates(params, updates)
        g3 = np.asarray(grads[3]["w"])
        np.testing.assert_array_equal(np.asarray(params["w"])[grown], (-lr * g3)[grown])
    else:
        np.testing.assert_array_equal(np.asarray(params["w"])[grown], (-lr * g)[grown])
        np.testing.assert_array_equal(trace[grown], g[grown])
    assert (np.asarray(params["w"])[dropped] == 0).all()
    # RigL grew the candidates with the largest |dense gradient| (the grads passed in).
    candidates = ~(old & new)
    assert np.abs(g[grown]).min() >= np.abs(g[candidates & ~grown]).max()


@pytest.mark.slow
def test_trains_with_inject_hyperparams_on_tree_with_norms():
    """A short run under inject_hyperparams(adamw) with biases and a norm scale lowers the loss,
    the learning rate can be changed through the state, and sparsity stays exact."""
    method = methods.set_(0.6, update_every=2, end_step=12, allocation="erk")
    tx = sparsify(optax.inject_hyperparams(optax.adamw)(learning_rate=0.05), method,
                  prunable=MATRIX)
    params = _init_params(jax.random.PRNGKey(3))
    state = tx.init(params)
    params = jax.tree_util.tree_map(lambda p, m: p * m, params, state.masks)
    x = jax.random.normal(jax.random.PRNGKey(4), (32, 6))
    y = jnp.tanh(x @ jax.random.normal(jax.random.PRNGKey(5), (6, 4)))

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(_loss)(params, x, y)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    counts = {k: int(state.masks[k]["kernel"].sum()) for k in ("dense1", "dense2")}
    losses = []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    for k, n in counts.items():
        assert int(state.masks[k]["kernel"].sum()) == n
        assert (np.asarray(params[k]["kernel"])[~np.asarray(state.masks[k]["kernel"])] == 0).all()
    lr = state.inner_state.hyperparams["learning_rate"]
    state.inner_state.hyperparams["learning_rate"] = jnp.zeros_like(lr)
    frozen, state, _ = step(params, state)
    # lr 0 through the injected hyperparameter: only the masks' changes move weights (to 0).
    for k in ("dense1", "dense2"):
        same = np.asarray(state.masks[k]["kernel"])
        np.testing.assert_array_equal(np.asarray(frozen[k]["kernel"])[same],
                                      np.asarray(params[k]["kernel"])[same])
