"""Schedules against hand-worked values, float64 loop references and Journey Matters' numbers."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import schedules as S


def test_doctests():
    assert doctest.testmod(S).failed == 0


# ------------------------------------------------------------------ float64 loop references


def ref_polynomial(T, s_f, b, e, power=3, s_i=0.0, every=1):
    """Zhu & Gupta evaluated step by step from the paper's definition."""
    values, level, updates = [], 0.0, []
    for t in range(T):
        if b <= t <= e and ((t - b) % every == 0 or t == e):
            level = s_f + (s_i - s_f) * (1 - (t - b) / (e - b)) ** power
            updates.append(t)
        values.append(level)
    return np.array(values), updates


def ref_geometric(T, s_f, b, e, every=1):
    """Journey Matters: n events from b every `every` steps before e, density (1-s_f)^(k+1/n)."""
    events = list(range(b, e, every))
    density = np.ones(T)
    for k, t in enumerate(events):
        density[t:] = (1 - s_f) ** ((k + 1) / len(events))
    return 1 - density, events


def jit_values(sched, T):
    """Evaluate the JAX path one traced scalar step at a time (vmap of a jitted function)."""
    steps = jnp.arange(T, dtype=jnp.int32)
    vals, upd = jax.jit(jax.vmap(lambda t: (sched(t), sched.is_update_step(t))))(steps)
    assert vals.dtype == jnp.float32 and upd.dtype == jnp.bool_
    return np.asarray(vals, np.float64), np.flatnonzero(np.asarray(upd)).tolist()


POLY_CASES = [
    dict(s_f=0.8, b=0, e=100, every=1),
    dict(s_f=0.9, b=7, e=53, every=5),  # window not a multiple of update_every
    dict(s_f=0.5, b=3, e=40, every=10, power=1, s_i=0.1),
    dict(s_f=0.95, b=0, e=9, every=3, power=2),
]


@pytest.mark.parametrize("case", POLY_CASES)
def test_polynomial_matches_reference(case):
    T = case["e"] + 20
    kw = dict(power=case.get("power", 3), s_i=case.get("s_i", 0.0), every=case["every"])
    want, updates = ref_polynomial(T, case["s_f"], case["b"], case["e"], **kw)
    sched = S.polynomial(
        case["s_f"],
        case["b"],
        case["e"],
        power=kw["power"],
        initial_sparsity=kw["s_i"],
        update_every=kw["every"],
    )
    np.testing.assert_allclose(sched(np.arange(T)), want, rtol=0, atol=1e-12)
    got, got_updates = jit_values(sched, T)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got_updates == updates
    assert got[-1] == np.float32(case["s_f"])


GEO_CASES = [(0.75, 10, 30, 10), (0.2, 2500, 8100, 100), (0.9, 0, 37, 5), (0.5, 4, 11, 1)]


@pytest.mark.parametrize("s_f,b,e,every", GEO_CASES)
def test_geometric_matches_reference(s_f, b, e, every):
    T = e + 30
    want, events = ref_geometric(T, s_f, b, e, every)
    sched = S.geometric(s_f, b, e, update_every=every)
    np.testing.assert_allclose(sched(np.arange(T)), want, rtol=0, atol=1e-12)
    got, got_updates = jit_values(sched, T)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got_updates == events
    assert got[e] == np.float32(s_f)  # final reached by the end of the window


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    s_f=st.floats(0.0, 0.99),
    b=st.integers(0, 30),
    length=st.integers(1, 80),
    every=st.integers(1, 12),
    power=st.sampled_from([1, 2, 3]),
)
def test_random_windows_match_references(s_f, b, length, every, power):
    e, T = b + length, b + length + 5
    want, _ = ref_polynomial(T, s_f, b, e, power=power, every=every)
    got = S.polynomial(s_f, b, e, power=power, update_every=every)(np.arange(T))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    want, _ = ref_geometric(T, s_f, b, e, every)
    got = S.geometric(s_f, b, e, update_every=every)(np.arange(T))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.all(np.diff(got) >= 0) and got[e] == s_f


def test_hand_worked_values():
    # Zhu & Gupta cubic, half way: 0.8 + (0 - 0.8) * 0.5**3 = 0.7.
    assert float(S.polynomial(0.8, 0, 100)(50)) == pytest.approx(0.7, abs=1e-7)
    # Linear from 0.2 to 0.6 over 40 steps, at step 10: 0.6 - 0.4 * 0.75 = 0.3.
    lin = S.polynomial(0.6, 0, 40, power=1, initial_sparsity=0.2)
    assert float(lin(10)) == pytest.approx(0.3, abs=1e-7)
    # Geometric, 3 events to 0.875: density after event k is (1/8)**((k+1)/3) = 2**-(k+1).
    geo = S.geometric(0.875, 0, 3)
    assert [float(geo(t)) for t in range(4)] == [0.5, 0.75, 0.875, 0.875]
    assert float(S.constant(0.3)(10**6)) == pytest.approx(0.3)


def test_iterative_and_one_shot():
    sched = S.iterative([0.25, 0.5, 0.75], [5, 10, 20])
    vals, updates = jit_values(sched, 30)
    want = [0.0] * 5 + [0.25] * 5 + [0.5] * 10 + [0.75] * 10
    np.testing.assert_array_equal(vals, np.array(want, np.float32))
    assert updates == [5, 10, 20]
    one = S.one_shot(0.5, 7)
    vals, updates = jit_values(one, 12)
    assert updates == [7] and vals[6] == 0.0 and vals[7] == 0.5 and vals[11] == 0.5


def test_constant_updates_forever():
    sched = S.constant(0.5, update_every=4)
    _, updates = jit_values(sched, 40)
    assert updates == list(range(0, 40, 4))
    assert sched.end_step is None and bool(sched.is_update_step(4 * 10**6))


ALL = [
    S.constant(0.4, update_every=3),
    S.polynomial(0.9, 5, 48, update_every=6),
    S.geometric(0.7, 5, 48, update_every=6),
    S.iterative([0.1, 0.6], [4, 30]),
    S.one_shot(0.3, 9),
    S.window(60, 0.5, update_every=4),
    S.window(60, 0.5, kind="polynomial", by="steps", update_every=2),
]


@pytest.mark.parametrize("sched", ALL)
def test_value_changes_only_at_update_steps(sched):
    vals, updates = jit_values(sched, 60)
    changed = [t for t in range(60) if vals[t] != (vals[t - 1] if t else 0.0)]
    assert set(changed) <= set(updates)
    assert all(vals >= 0) and all(vals < 1)
    # Python ints, numpy and traced steps agree.
    for t in (0, 9, 31, 59):
        assert float(sched(t)) == pytest.approx(vals[t], abs=1e-6)
        assert bool(sched.is_update_step(t)) == (t in updates)


# ------------------------------------------------------------------ Journey Matters


@pytest.mark.parametrize(
    "s_f,b,e,T,published", [(0.2, 2500, 8100, 11200, 0.8919), (0.4, 2500, 8875, 13050, 0.7651)]
)
def test_journey_matters_model_cards(s_f, b, e, T, published):
    sched = S.geometric(s_f, b, e, update_every=100)
    avg = S.average_density(sched, T)
    assert abs(avg - published) < 1e-3
    want, _ = ref_geometric(T, s_f, b, e, 100)
    assert avg == pytest.approx(float(np.mean(1 - want)), abs=1e-12)
    # The other natural placement (events at b+100, ..., e) misses the published value.
    shifted, _ = ref_geometric(T, s_f, b + 100, e + 1, 100)
    assert abs(float(np.mean(1 - shifted)) - published) > 1e-3


def simulated_window_density(s_f, start, end, kind, T=200_000):
    """Average density of a window placed by compute, simulated step by step (independent of
    the library): density 1 before the window, q^u (geometric) or 1 - s(1 - (1 - u)^3)
    (polynomial) inside it, q after; the window's ends are moved until the compute before
    them is ``start`` and ``end`` of the total (damped fixed point)."""
    q, t = 1.0 - s_f, np.arange(T, dtype=np.float64)
    b, e = start * T, end * T
    for _ in range(200):
        u = np.clip((t - b) / (e - b), 0.0, 1.0)
        inside = q**u if kind == "geometric" else 1.0 - s_f * (1.0 - (1.0 - u) ** 3)
        d = np.where(t < b, 1.0, inside)
        c = np.concatenate([[0.0], np.cumsum(d)])  # compute before each step
        nb = np.interp(start * c[-1], c, np.arange(T + 1.0))
        ne = np.interp(end * c[-1], c, np.arange(T + 1.0))
        if abs(nb - b) + abs(ne - e) < 1e-6:
            break
        b, e = 0.5 * (b + nb), 0.5 * (e + ne)
    return float(d.mean())


@pytest.mark.parametrize("s_f,published", [(0.2, 0.8926), (0.4, 0.7662)])
def test_window_by_compute_continuous_limit(s_f, published):
    """Journey Matters' continuous-window densities, reproduced by a step-by-step simulation;
    the library's closed form and its discrete window schedule agree with both."""
    assert simulated_window_density(s_f, 0.25, 0.75, "geometric") == pytest.approx(
        published, abs=6e-5)
    T = 100_000
    for kind in ("geometric", "polynomial"):
        sim = simulated_window_density(s_f, 0.25, 0.75, kind)
        closed = S.window_average_density(s_f, 0.25, 0.75, kind=kind, by="compute")
        assert closed == pytest.approx(sim, abs=2e-5), kind
        assert S.average_density(S.window(T, s_f, kind=kind), T) == pytest.approx(sim, abs=1e-4)


@pytest.mark.parametrize(
    "T,s_f,every,start,end",
    [
        (11200, 0.2, 100, 0.25, 0.75),
        (13050, 0.4, 100, 0.25, 0.75),
        (5000, 0.6, 1, 0.1, 0.9),
        (777, 0.9, 13, 0.3, 1.0),
        (500, 0.5, 1, 0.0, 0.5),
    ],
)
@pytest.mark.parametrize("kind", ["geometric", "polynomial"])
def test_window_places_begin_and_end_by_compute(T, s_f, every, start, end, kind):
    sched = S.window(T, s_f, start=start, end=end, kind=kind, update_every=every)
    compute = np.concatenate([[0.0], np.cumsum(1 - sched(np.arange(T)))])  # C(t), t = 0..T
    total = compute[-1]
    # Each boundary sits within one step's compute of its target.
    assert abs(compute[sched.begin_step] - start * total) <= 1.0
    assert abs(compute[sched.end_step] - end * total) <= 1.0


def test_window_reproduces_journey_matters_windows():
    # The published runs pruned from 2500 to 8100 (of 11200) and 2500 to 8875 (of 13050).
    a = S.window(11200, 0.2, update_every=100)
    b = S.window(13050, 0.4, update_every=100)
    assert abs(a.begin_step - 2500) <= 10 and abs(a.end_step - 8100) <= 30
    assert abs(b.begin_step - 2500) <= 10 and abs(b.end_step - 8875) <= 30


def test_window_by_steps():
    sched = S.window(1000, 0.5, start=0.1, end=0.6, by="steps", update_every=7)
    assert (sched.begin_step, sched.end_step, sched.update_every) == (100, 600, 7)
    assert float(sched(999)) == pytest.approx(0.5)


def test_average_density_hand_worked_and_large():
    assert S.average_density(S.constant(0.3), 10) == pytest.approx(0.7)
    assert S.average_density(S.one_shot(0.5, 50), 100) == pytest.approx(0.75)
    # Two levels: 4 dense steps, 4 at 0.25, 2 at 0.5 -> (4 + 3 + 1) / 10.
    assert S.average_density(S.iterative([0.25, 0.5], [4, 8]), 10) == pytest.approx(0.8)
    T = 100_000
    sched = S.polynomial(0.9, 1000, 90_000, update_every=10)
    want, _ = ref_polynomial(T, 0.9, 1000, 90_000, every=10)
    assert S.average_density(sched, T) == pytest.approx(float(np.mean(1 - want)), abs=1e-12)


# ------------------------------------------------------------------ bad input


BAD = [
    (lambda: S.constant(1.0), "sparsity"),
    (lambda: S.constant(-0.1), "sparsity"),
    (lambda: S.constant(0.5, update_every=0), "update_every"),
    (lambda: S.polynomial(0.5, 10, 10), "begin_step"),
    (lambda: S.polynomial(0.5, -1, 10), "begin_step"),
    (lambda: S.polynomial(0.5, 0, 10, power=0), "power"),
    (lambda: S.polynomial(0.5, 0, 10, initial_sparsity=1.5), "initial_sparsity"),
    (lambda: S.geometric(1.2, 0, 10), "final_sparsity"),
    (lambda: S.geometric(0.5, 20, 10), "begin_step"),
    (lambda: S.one_shot(0.5, -3), "at_step"),
    (lambda: S.iterative([0.1, 0.2], [5]), "equal length"),
    (lambda: S.iterative([0.1, 0.2], [5, 5]), "strictly increasing"),
    (lambda: S.window(100, 0.5, kind="cubic"), "kind"),
    (lambda: S.window(100, 0.5, by="flops"), "by"),
    (lambda: S.window(100, 0.5, start=0.8, end=0.2), "start and end"),
    (lambda: S.window(100, 0.5, end=1.5), "start and end"),
    (lambda: S.window(1, 0.5), "total_steps"),
    (lambda: S.average_density(S.constant(0.5), 0), "total_steps"),
]


@pytest.mark.parametrize("make,match", BAD)
def test_bad_input_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kind", ["geometric", "polynomial"])
@pytest.mark.parametrize("by", ["steps", "compute"])
def test_one_average_density_discrete_approaches_continuous(kind, by):
    """``average_density`` of a concrete many-step window schedule (exact mean over steps)
    converges to the closed form ``window_average_density`` that ``window`` and
    ``scaling.plan_sparse`` share."""
    closed = S.window_average_density(0.6, 0.25, 0.75, kind=kind, by=by)
    errors = [abs(S.average_density(S.window(T, 0.6, kind=kind, by=by), T) - closed)
              for T in (400, 4000)]
    assert errors[1] < 2e-3 and errors[1] < errors[0]
