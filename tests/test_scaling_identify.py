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


# --- which runner-up optima a fit keeps as refit starts (identify.sound, fit._distinct_optima)

# A hand-made box over (a, b, e, alpha, beta) and a point well inside it: E = 1, A = e^5,
# B = e^6, alpha = beta = 0.3 on 4 N x 4 D over 3 decades each (every term 0.09 to 15); alpha's
# box is [0.2, 0.4], so moving it to a bound keeps every direction measured.
BOX_LO = np.array([0.0, 0.0, -2.0, 0.2, 0.0])
BOX_HI = np.array([30.0, 30.0, 2.0, 0.4, 2.0])
INSIDE = np.array([5.0, 6.0, 0.0, 0.3, 0.3])


def _design(n_values, d_values):
    n, d = (a.ravel() for a in np.meshgrid(n_values, d_values))
    return n, d, forms.CHINCHILLA.design({"N": n, "D": d})


def _fd_min_eigenvalue(n, d, theta, free):
    """The smallest eigenvalue of J^T J / n, J by central differences of the law written out
    in float64 numpy (no scaling code)."""
    def logp(t):
        return np.log(np.exp(t[2]) + np.exp(t[0]) * n ** -t[3] + np.exp(t[1]) * d ** -t[4])

    h = 1e-6
    jac = np.stack([(logp(theta + h * e) - logp(theta - h * e)) / (2 * h) for e in np.eye(5)],
                   axis=1)[:, free]
    return np.linalg.eigvalsh(jac.T @ jac / n.size)[0]


def test_sound_rejects_a_free_parameter_on_either_bound_and_a_flat_direction():
    """``identify.sound`` (the refit-start filter): a point inside the box with every direction
    measured is sound; a free parameter within ``ON_BOUND`` x the box width (1e-6 x 0.2 =
    2e-7 for alpha) of its lower or upper bound is not, a fixed one is not looked at; a sweep
    with one D (the B term and E cannot be told apart) is not."""
    n, d, design = _design(np.geomspace(1e5, 1e8, 4), np.geomspace(1e7, 1e10, 4))
    free = np.ones(5, bool)
    for alpha in (0.2, 0.3, 0.4):  # every direction measured, at the bounds too
        theta = INSIDE.copy()
        theta[3] = alpha
        assert _fd_min_eigenvalue(n, d, theta, free) > 1e3 * identify.CURVATURE_FLOOR
    assert identify.sound(design, INSIDE, free, BOX_LO, BOX_HI)
    for alpha, ok in ((0.4, False), (0.4 - 1e-7, False), (0.4 - 1e-6, True),
                      (0.2, False), (0.2 + 1e-7, False), (0.2 + 1e-6, True)):
        theta = INSIDE.copy()
        theta[3] = alpha
        assert identify.sound(design, theta, free, BOX_LO, BOX_HI) is ok, alpha
    hi_e = BOX_HI.copy()
    hi_e[2] = INSIDE[2]  # E on its upper bound: a log-coefficient counts the same way
    assert not identify.sound(design, INSIDE, free, BOX_LO, hi_e)
    fixed_alpha = free.copy()
    fixed_alpha[3] = False
    on_alpha = INSIDE.copy()
    on_alpha[3] = BOX_HI[3]
    assert identify.sound(design, on_alpha, fixed_alpha, BOX_LO, BOX_HI)
    n1, d1, one_d = _design(np.geomspace(1e5, 1e8, 4), [1e8])
    assert _fd_min_eigenvalue(n1, d1, INSIDE, free) < 1e-3 * identify.CURVATURE_FLOOR
    assert not identify.sound(one_d, INSIDE, free, BOX_LO, BOX_HI)


def test_distinct_optima_keeps_sound_runners_up_of_a_sound_best():
    """``fit._distinct_optima``: optima in objective order, a near-duplicate (within 1e-3 of
    one already seen) and non-finite objectives left out, at most ``k``; runners-up that fail
    ``keep`` are dropped when the best passes it, and all kept when the best fails it."""
    from scaling.fit import _distinct_optima

    theta = np.array([
        [5.0, 5.0],      # objective 2.0, sound
        [0.0, 0.0],      # 1.0: the best, sound
        [-1.0, 0.0],     # 1.5: unsound (keep is False for a negative first entry)
        [0.0, 0.0005],   # 1.1: the best again, within 1e-3
        [3.0, 3.0],      # nan: not an optimum
        [7.0, 7.0],      # 3.0, sound
        [-2.0, 1.0],     # 2.5: unsound
    ])
    obj = np.array([2.0, 1.0, 1.5, 1.1, np.nan, 3.0, 2.5])
    keep = lambda t: t[0] >= 0  # noqa: E731
    np.testing.assert_array_equal(_distinct_optima(theta, obj, keep),
                                  [[0.0, 0.0], [5.0, 5.0], [7.0, 7.0]])
    np.testing.assert_array_equal(_distinct_optima(theta, obj, keep, k=2),
                                  [[0.0, 0.0], [5.0, 5.0]])
    # the best fails keep (a degenerate fit): every distinct runner-up is a start
    worse = obj.copy()
    worse[1], worse[3] = 9.0, 9.5  # (0, 0) and its twin now come last
    np.testing.assert_array_equal(
        _distinct_optima(theta, worse, keep),
        [[-1.0, 0.0], [5.0, 5.0], [-2.0, 1.0], [7.0, 7.0], [0.0, 0.0]])


def test_a_sound_fit_starts_its_refits_only_from_sound_distinct_optima():
    """On a well-posed sweep the fit's ``optima`` (the bootstrap's and leave-one-out's starts)
    begin with the fit itself, are distinct, and every one passes ``identify.sound`` in the
    fit's own box."""
    n, d, loss = _grid_sweep()
    fit = fit_chinchilla(n, d, loss, grid="coarse")
    assert not fit.degenerate and len(fit.optima) >= 2
    np.testing.assert_array_equal(fit.optima[0], fit.theta)
    design = forms.CHINCHILLA.design({"N": n, "D": d})
    for i, t in enumerate(fit.optima):
        assert identify.sound(design, t, np.ones(5, bool), fit.box[0], fit.box[1]), i
        others = np.delete(fit.optima, i, axis=0)
        assert np.all(np.max(np.abs(others - t), axis=1) > 1e-3), i
