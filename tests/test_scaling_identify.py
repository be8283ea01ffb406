"""Fits that refuse to lie (issue 14): bounds, the degenerate flag and its reasons, the
planner's refusal, fixed coefficients."""

from __future__ import annotations

import numpy as np
import pytest

from scaling import ChinchillaLaw, fit_chinchilla, forms, identify
from scaling.plan import DegenerateLawError, average_density, plan_sparse
from scaling.uncertainty import Bootstrap

LAW = ChinchillaLaw(E=1.2, A=40.0, B=60.0, alpha=0.32, beta=0.27)


def _issue_sweep(seed=1):
    """Issue 14's 8 runs: 2 sizes x {dense, window to 0.5} x {300, 600} steps -> 2 distinct D."""
    rng = np.random.default_rng(seed)
    n, d = [], []
    for n_params in (2.0e5, 8.0e5):
        for s in (0.0, 0.5):
            for steps in (300, 600):
                n.append(n_params * average_density(s, 0.25, 0.75))
                d.append(steps * 16 * 128)
    n, d = np.array(n), np.array(d, np.float64)
    return n, d, LAW.predict(n, d) * np.exp(rng.normal(0.0, 0.005, n.size))


def _grid_sweep(seed=0, sigma=0.003):
    """A well-posed sweep: 5 N x 4 D, float64 numpy, small multiplicative noise."""
    rng = np.random.default_rng(seed)
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(2e5, 2e7, 5), np.geomspace(2e7, 2e9, 4)))
    return n, d, LAW.predict(n, d) * np.exp(rng.normal(0.0, sigma, n.size))


def test_two_budgets_are_flagged_and_the_planner_refuses_unless_forced():
    fit = fit_chinchilla(*_issue_sweep(), grid="coarse")
    assert fit.degenerate
    assert any("beta is not identified: D has 2 distinct value(s)" in r for r in fit.reasons)
    assert any("Hessian" in r for r in fit.reasons)  # the curvature check sees it too
    assert "DEGENERATE: beta is not identified" in repr(fit)
    assert fit.law.degenerate and fit.warning().startswith("degenerate fit: ")
    with pytest.raises(DegenerateLawError, match="refusing to plan.*beta is not identified"):
        plan_sparse(fit, 1e16, 0.5)
    with pytest.raises(DegenerateLawError):  # the law carries the flag
        plan_sparse(fit.law, 1e16, 0.5)
    forced = plan_sparse(fit, 1e16, 0.5, force=True)
    opt = fit.law.compute_optimal(1e16)
    assert forced.n_avg == pytest.approx(float(opt.N)) and forced.tokens == pytest.approx(
        float(opt.D)
    )
    # every coefficient stays in its recorded box
    for k, (lo, hi) in fit.bounds.items():
        assert lo <= getattr(fit, k) <= hi, k


def test_well_posed_sweep_is_recovered_and_not_flagged():
    n, d, loss = _grid_sweep()
    fit = fit_chinchilla(n, d, loss, grid="coarse")
    assert not fit.degenerate, fit.reasons
    assert fit.E == pytest.approx(LAW.E, rel=0.05)
    assert fit.alpha == pytest.approx(LAW.alpha, rel=0.1)
    assert fit.beta == pytest.approx(LAW.beta, rel=0.1)
    np.testing.assert_allclose(fit.predict(n, d), LAW.predict(n, d), rtol=0.004)
    # the recorded boxes follow the documented rules, recomputed here by hand
    lmin = loss.min()
    assert fit.bounds["E"] == pytest.approx((1e-3 * lmin, lmin))
    assert fit.bounds["alpha"] == (0.0, 2.0) and fit.bounds["beta"] == (0.0, 2.0)
    assert fit.bounds["A"][0] == pytest.approx(1e-3 * lmin)  # alpha = 0, every N > 1
    assert fit.bounds["A"][1] == pytest.approx(np.min(loss * n**2.0))  # alpha = 2
    assert fit.bounds["B"][1] == pytest.approx(np.min(loss * d**2.0))
    plan = plan_sparse(fit, 1e17, 0.5)  # no refusal
    assert plan.n_dense > 0


def test_an_optimum_on_a_bound_is_flagged_and_equals_the_fit_with_it_fixed():
    n, d, loss = _grid_sweep(seed=2)
    capped = fit_chinchilla(n, d, loss, grid="coarse", bounds={"alpha": (0.0, 0.2)})
    assert capped.alpha == pytest.approx(0.2, abs=1e-9)
    assert capped.bounds["alpha"] == (0.0, 0.2)
    assert any(r.startswith("alpha = 0.2 sits on its upper bound") for r in capped.reasons)
    # the bounded optimum with alpha active is the optimum with alpha pinned there
    pinned = fit_chinchilla(n, d, loss, grid="coarse", fixed={"alpha": 0.2})
    assert capped.objective == pytest.approx(pinned.objective, rel=1e-6)
    for k in ("E", "A", "B", "beta"):
        assert getattr(capped, k) == pytest.approx(getattr(pinned, k), rel=1e-3), k
    assert not pinned.degenerate  # a fixed coefficient is never "on a bound"
    # a coefficient bound (enforced in the solver's second phase): E held above its truth
    high_e = fit_chinchilla(n, d, loss, grid="coarse", bounds={"E": (1.3, 1.5)})
    assert high_e.E == pytest.approx(1.3, rel=1e-9)
    assert any(r.startswith("E = 1.3 sits on its lower bound") for r in high_e.reasons)
    pinned_e = fit_chinchilla(n, d, loss, grid="coarse", fixed={"E": 1.3})
    assert high_e.objective == pytest.approx(pinned_e.objective, rel=1e-6)
    with pytest.raises(ValueError, match=r"fixed\['alpha'\] = 2.5 is outside \[0, 2\]"):
        fit_chinchilla(n, d, loss, grid="coarse", fixed={"alpha": 2.5})
    with pytest.raises(ValueError, match=r"fixed\['E'\] = 9 is outside"):
        fit_chinchilla(n, d, loss, grid="coarse", fixed={"E": 9.0})  # above every loss
    with pytest.raises(ValueError, match="bounds: unknown parameter 'gamma'"):
        fit_chinchilla(n, d, loss, bounds={"gamma": (0, 1)})


def test_fixing_e_recovers_the_others_and_identifies_the_issue_sweep():
    n, d, loss = _grid_sweep(seed=3)
    fit = fit_chinchilla(n, d, loss, grid="coarse", fixed={"E": LAW.E})
    assert fit.E == LAW.E and fit.fixed == ("E",) and not fit.degenerate
    assert fit.alpha == pytest.approx(LAW.alpha, rel=0.05)
    assert fit.beta == pytest.approx(LAW.beta, rel=0.05)
    assert fit.A == pytest.approx(LAW.A, rel=0.3) and fit.B == pytest.approx(LAW.B, rel=0.3)
    # issue 14's sweep: with E pinned, the 4 N_avg values and 2 budgets identify the rest
    sweep = fit_chinchilla(*_issue_sweep(), grid="coarse", fixed={"E": LAW.E})
    assert not sweep.degenerate, sweep.reasons


def test_the_curvature_check_alone_catches_a_2x2_grid_with_e_fixed():
    # L = E + x(N) + y(D) on 2 N x 2 D: a shift between x and y is free even with E known
    n, d = np.array([1e6, 1e6, 4e6, 4e6, 1e6]), np.array([1e8, 4e8, 1e8, 4e8, 4e8])
    loss = LAW.predict(n, d)
    fit = fit_chinchilla(n, d, loss, grid="coarse", fixed={"E": LAW.E})
    assert [r for r in fit.reasons if "distinct" in r] == []  # E fixed: the count rule is off
    assert any("Hessian" in r for r in fit.reasons), fit.reasons


def test_log_jacobian_and_curvature_against_finite_differences():
    n, d, loss = _grid_sweep()
    fit = fit_chinchilla(n, d, loss, grid="coarse")
    theta = fit.theta
    logp = lambda t: np.log(  # noqa: E731 - the law written out in float64 numpy
        np.exp(t[2]) + np.exp(t[0]) * n ** -t[3] + np.exp(t[1]) * d ** -t[4]
    )
    h = 1e-6
    fd = np.stack(
        [(logp(theta + h * e) - logp(theta - h * e)) / (2 * h) for e in np.eye(5)], axis=1
    )
    jac = identify.log_jacobian(forms.CHINCHILLA.design({"N": n, "D": d}), theta)
    np.testing.assert_allclose(jac, fd, rtol=1e-6, atol=1e-9)
    lam = np.linalg.eigvalsh(fd.T @ fd / n.size)[0]
    assert lam > identify.CURVATURE_FLOOR  # what diagnose compared: not flagged


def test_bootstrap_interval_excluding_the_estimate_is_a_reason():
    n, d, loss = _grid_sweep()
    fit = fit_chinchilla(n, d, loss, grid="coarse")
    names = fit._order
    est = fit.coefficients()
    samples = np.array([[est[k] for k in names]] * 40, np.float64)
    samples[:, names.index("beta")] = np.linspace(1.5, 1.9, 40)  # interval far from 0.27
    flagged = fit.with_bootstrap(Bootstrap(names=names, samples=samples, estimate=est))
    assert flagged.degenerate and not fit.degenerate
    (reason,) = flagged.reasons
    assert reason.startswith("the bootstrap 95% interval of beta [1.51, 1.89]")
    assert reason.endswith(f"excludes its estimate {fit.beta:.4g}")
    with pytest.raises(DegenerateLawError, match="bootstrap 95% interval of beta"):
        plan_sparse(flagged, 1e17, 0.5)
