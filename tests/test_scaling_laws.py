"""Law objects and the sparse planner against numeric minimisation and step-by-step schedules."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from scaling import ChinchillaLaw, FrantarLaw, average_density, plan_sparse
from scaling.plan import KINDS, window_mean_density

HOFFMANN = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BESIROGLU = ChinchillaLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def _numeric_optimum(law, c):
    res = minimize_scalar(
        lambda ln: float(law.isoflop(c, np.exp(ln))),
        bounds=(np.log(1e3), np.log(1e16)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return np.exp(res.x)


@pytest.mark.parametrize("law", [HOFFMANN, BESIROGLU])
@pytest.mark.parametrize("flops", [1e18, 5.76e23, 1e26])
def test_closed_form_compute_optimum_matches_numeric_minimisation(law, flops):
    opt = law.compute_optimal(flops)
    n_num = _numeric_optimum(law, flops)
    assert float(opt.N) == pytest.approx(n_num, rel=1e-5)
    assert float(opt.N * opt.D) * 6 == pytest.approx(flops, rel=1e-12)
    assert float(opt.loss) == pytest.approx(float(law.isoflop(flops, n_num)), rel=1e-10)


def test_compute_optimal_exponents_and_published_value():
    a, b = BESIROGLU.exponents
    assert a + b == pytest.approx(1.0)
    assert a == pytest.approx(0.513, abs=1e-3)  # Besiroglu et al.'s reported a
    c = np.array([1e20, 1e22])
    n = BESIROGLU.compute_optimal(c).N
    assert np.log(n[1] / n[0]) / np.log(100) == pytest.approx(a, rel=1e-12)
    # Hoffmann et al.'s Chinchilla budget gives a model in the tens of billions
    assert 1e10 < float(HOFFMANN.compute_optimal(5.76e23).N) < 1e11


def test_predict_is_the_formula_and_validates():
    assert float(HOFFMANN.predict(1e9, 2e10)) == pytest.approx(
        1.69 + 406.4 / 1e9**0.34 + 410.7 / 2e10**0.28, rel=1e-14
    )
    with pytest.raises(ValueError, match="N must be"):
        HOFFMANN.predict(-1.0, 1e9)
    with pytest.raises(ValueError, match="alpha"):
        ChinchillaLaw(E=1.0, A=1.0, B=1.0, alpha=0.0, beta=0.3).compute_optimal(1e20)
    with pytest.raises(ValueError, match="flops"):
        HOFFMANN.compute_optimal(0.0)
    with pytest.raises(ValueError, match="A must be finite and >= 0"):
        ChinchillaLaw(E=1.0, A=-1.0, B=1.0, alpha=0.3, beta=0.3)
    # a fit may land on a negative exponent: it still predicts, but has no optimum
    odd = ChinchillaLaw(E=1.0, A=1.0, B=1.0, alpha=-0.1, beta=0.3)
    assert float(odd.predict(1e4, 1e4)) == pytest.approx(1.0 + 1e4**0.1 + 1e4**-0.3)


def test_frantar_law_at_sparsity():
    law = FrantarLaw(a=1.3, b=0.82, c=2.08, d=0.39, e=0.28, f=0.89, g=4.52)  # Frantar ViT
    s, n, d = 0.75, 30.0, 2.0
    expected = (1.3 * 0.25**0.82 + 2.08) * n**-0.39 + 0.28 * d**-0.89 + 4.52
    assert float(law.predict(s, n, d)) == pytest.approx(expected, rel=1e-14)
    assert float(law.at_sparsity(s).predict(n, d)) == pytest.approx(expected, rel=1e-14)
    # denser is better at equal non-zero count only through the (1-S)^b term
    assert law.predict(0.9, n, d) < law.predict(0.0, n, d)
    with pytest.raises(ValueError, match="S must be"):
        law.predict(1.0, n, d)


def _simulate(final, start, end, kind, by, power=3, steps=200_000):
    """Step-by-step density of the window schedule, placed by steps or by compute."""
    q = 1.0 - final
    u = (np.arange(steps) + 0.5) / steps

    def dens(t0, t1):
        w = np.clip((u - t0) / (t1 - t0), 0.0, 1.0) if t1 > t0 else (u >= t0).astype(float)
        if kind == "geometric":
            return q**w
        return 1.0 - final * (1.0 - (1.0 - w) ** power)

    if by == "steps":
        return dens(start, end).mean()
    # by compute: find step fractions whose cumulative compute shares are start and end
    t0, t1 = start, end
    for _ in range(80):  # damped fixed point on the window placement
        d = dens(t0, t1)
        cum = np.cumsum(d) / d.sum()
        t0 = 0.5 * (t0 + np.interp(start, cum, u))
        t1 = 0.5 * (t1 + np.interp(end, cum, u))
    return dens(t0, t1).mean()


@pytest.mark.parametrize("kind, power", [("geometric", 3), ("polynomial", 1),
                                         ("polynomial", 3)])
@pytest.mark.parametrize("by", ["steps", "compute"])
@pytest.mark.parametrize("final", [0.5, 0.9])
def test_average_density_matches_a_step_by_step_schedule(kind, power, by, final):
    exact = average_density(final, 0.25, 0.75, kind=kind, by=by, power=power)
    assert exact == pytest.approx(_simulate(final, 0.25, 0.75, kind, by, power), rel=2e-4)


def test_average_density_edge_cases():
    assert average_density(0.0) == 1.0
    assert average_density(0.8, 0.0, 0.0, by="steps") == pytest.approx(0.2)  # sparse throughout
    assert average_density(0.8, 1.0, 1.0, by="steps") == pytest.approx(1.0)  # never pruned
    assert window_mean_density(0.75) == pytest.approx(0.75 / np.log(4))
    for bad in ({"final_sparsity": 1.0}, {"final_sparsity": 0.5, "start": 0.8, "end": 0.2}):
        with pytest.raises(ValueError):
            average_density(**bad)
    with pytest.raises(ValueError, match="kind"):
        average_density(0.5, kind="exp")
    with pytest.raises(ValueError, match="kind='polynomial', power=3"):
        average_density(0.5, kind="cubic")  # one vocabulary: the schedules' kind names


def test_plan_sparse_minimises_predicted_loss_over_dense_size():
    law, flops, s = BESIROGLU, 1e21, 0.75
    plan = plan_sparse(law, flops, s, 0.25, 0.75)
    rho = average_density(s, 0.25, 0.75)

    def loss_of_dense(ln_dense):  # train a dense size N_d: N_avg = rho N_d, D = C / (6 N_avg)
        n_avg = rho * np.exp(ln_dense)
        return float(law.predict(n_avg, flops / (6 * n_avg)))

    res = minimize_scalar(
        loss_of_dense,
        bounds=(np.log(1e5), np.log(1e14)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert plan.n_dense == pytest.approx(np.exp(res.x), rel=1e-5)
    assert plan.loss == pytest.approx(res.fun, rel=1e-10)
    assert plan.n_avg == pytest.approx(plan.n_dense * rho)
    assert plan.n_final == pytest.approx(plan.n_dense * 0.25)
    assert 6 * plan.n_avg * plan.tokens == pytest.approx(flops)
    # a sparse plan builds a larger dense model than the dense optimum, same N_avg
    assert plan.n_dense > float(law.compute_optimal(flops).N)


@pytest.mark.parametrize("kind, power", [("geometric", 3.0), ("polynomial", 1.0),
                                         ("polynomial", 3.0), ("polynomial", 0.5)])
@pytest.mark.parametrize("by", ["steps", "compute"])
def test_average_density_is_the_schedules_closed_form(kind, power, by):
    """``scaling`` imports nothing of ``sparsejax`` and keeps its own copy of the closed form
    ``sparsejax.schedules.window_average_density`` (which places ``window`` schedules): the
    two must stay the same function, errors included."""
    from sparsejax import schedules

    for final in (0.0, 0.1, 0.5, 0.9, 0.99):
        for start, end in ((0.25, 0.75), (0.0, 1.0), (0.1, 0.1), (0.5, 0.9)):
            ours = average_density(final, start, end, kind=kind, by=by, power=power)
            theirs = schedules.window_average_density(final, start, end, kind=kind, by=by,
                                                      power=power)
            assert ours == theirs, (final, start, end)
        assert window_mean_density(final, kind, power=power) == schedules.window_mean_density(
            final, kind, power=power)
    assert KINDS == schedules.WINDOW_KINDS
    for bad in ({"kind": "cubic"}, {"kind": "linear"}, {"by": "tokens"}, {"start": 0.9},
                {"final_sparsity": 1.0}, {"power": 0.0, "kind": "polynomial"}):
        args = {"final_sparsity": 0.5, "start": 0.5, "end": 0.75, **bad}
        with pytest.raises(ValueError) as ours_err:
            average_density(**args)
        with pytest.raises(ValueError) as theirs_err:
            schedules.window_average_density(**args)
        assert str(ours_err.value) == str(theirs_err.value)
