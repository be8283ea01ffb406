"""Chinchilla fits: the published replication (Besiroglu et al. 2024), synthetic recovery,
fixed parameters, the asymmetric penalty and input validation."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from scaling import ChinchillaFit, ChinchillaLaw, fit_chinchilla


def _read(path):
    with open(path, newline="") as fh:
        rows = [(float(r["N"]), float(r["D"]), float(r["loss"])) for r in csv.DictReader(fh)]
    return np.array(rows).T


@pytest.fixture(scope="module")
def chinchilla(reference_data):
    return _read(reference_data / "chinchilla_svg_extracted.csv")


@pytest.fixture(scope="module")
def epoch_fit(chinchilla):
    return fit_chinchilla(*chinchilla, drop_highest=5)


@pytest.mark.slow
def test_epoch_grid_fit_reproduces_besiroglu_et_al(epoch_fit):
    fit = epoch_fit
    assert isinstance(fit, ChinchillaFit)
    assert fit.n_points == 240 and fit.n_starts == 4500
    published = {"E": 1.8172, "A": 477.8, "B": 2143, "alpha": 0.3473, "beta": 0.3672}
    for k, v in published.items():
        assert getattr(fit, k) == pytest.approx(v, rel=5e-3), k
    assert fit.objective == pytest.approx(1.0183e-3, rel=1e-3)
    assert fit.n_converged >= 0.99 * fit.n_starts
    assert fit.n_at_best > 100  # many starts agree on the optimum
    assert not fit.degenerate, fit.reasons  # inside its bounds, identified (scaling.identify)
    # the compute-optimal exponent a = beta / (alpha + beta) they report: 0.513
    assert fit.law.exponents[0] == pytest.approx(0.513, abs=2e-3)


def test_objective_is_the_sum_of_huber_on_log_residuals(chinchilla, epoch_fit):
    N, D, loss = chinchilla
    keep = np.argsort(loss)[:-5]
    r = np.log(epoch_fit.predict(N[keep], D[keep])) - np.log(loss[keep])
    huber = np.where(np.abs(r) <= 1e-3, 0.5 * r**2, 1e-3 * (np.abs(r) - 5e-4))
    assert epoch_fit.objective == pytest.approx(huber.sum(), rel=1e-9)


def test_coarse_grid_finds_the_same_optimum(chinchilla, epoch_fit):
    coarse = fit_chinchilla(*chinchilla, drop_highest=5, grid="coarse")
    assert coarse.objective == pytest.approx(epoch_fit.objective, rel=1e-8)
    assert coarse.alpha == pytest.approx(epoch_fit.alpha, rel=1e-5)


def _synthetic(seed, n_outliers=3):
    rng = np.random.default_rng(seed)
    law = ChinchillaLaw(E=1.7, A=400.0, B=1500.0, alpha=0.33, beta=0.30)
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 3e10, 9), np.geomspace(1e9, 1e12, 9)))
    loss = law.predict(N, D) * np.exp(rng.normal(0.0, 0.005, N.size))
    out = rng.choice(N.size, n_outliers, replace=False)
    loss[out] *= 1.25  # diverged or badly tuned runs
    return law, N, D, loss


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_recovery_with_noise_and_outliers(seed):
    law, N, D, loss = _synthetic(seed)
    fit = fit_chinchilla(N, D, loss, grid="coarse")
    assert fit.E == pytest.approx(law.E, rel=0.03)
    assert fit.alpha == pytest.approx(law.alpha, rel=0.06)
    assert fit.beta == pytest.approx(law.beta, rel=0.06)
    n_grid = np.geomspace(1e8, 1e11, 5)
    np.testing.assert_allclose(
        fit.predict(n_grid, 20 * n_grid), law.predict(n_grid, 20 * n_grid), rtol=0.01
    )
    # squared loss (a Huber delta larger than every residual) is pulled off by the outliers
    ls = fit_chinchilla(N, D, loss, grid="coarse", huber_delta=10.0)
    err = lambda f: abs(f.E / law.E - 1) + abs(f.alpha / law.alpha - 1) + abs(f.beta / law.beta - 1)
    assert err(fit) < err(ls)


def test_fixed_parameters_stay_fixed_and_match_a_free_fit_at_truth():
    law, N, D, loss = _synthetic(0, n_outliers=0)
    fixed = fit_chinchilla(N, D, loss, grid="coarse", fixed={"E": 1.7, "alpha": 0.33})
    assert fixed.E == 1.7 and fixed.alpha == 0.33
    assert set(fixed.fixed) == {"E", "alpha"}
    assert fixed.beta == pytest.approx(0.30, rel=0.03)
    assert "(fixed)" in repr(fixed)
    with pytest.raises(ValueError, match="unknown parameter"):
        fit_chinchilla(N, D, loss, fixed={"gamma": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        fit_chinchilla(N, D, loss, fixed={"A": -1.0})


def test_asymmetric_penalty_shifts_the_fit_toward_the_lower_envelope():
    law, N, D, loss = _synthetic(2, n_outliers=0)
    loss = loss * np.exp(np.abs(np.random.default_rng(5).normal(0, 0.03, loss.size)))
    sym = fit_chinchilla(N, D, loss, grid="coarse")
    low = fit_chinchilla(N, D, loss, grid="coarse", asymmetry=0.1)
    res_sym = np.log(loss / sym.predict(N, D))
    res_low = np.log(loss / low.predict(N, D))
    assert np.mean(res_low > 0) > np.mean(res_sym > 0)  # more points above the curve
    assert np.median(res_low) > np.median(res_sym)
    with pytest.raises(ValueError, match="asymmetry"):
        fit_chinchilla(N, D, loss, asymmetry=1.5)


def test_repr_is_a_readable_table(epoch_fit):
    text = repr(epoch_fit)
    for key in ("E", "A", "B", "alpha", "beta", "objective", "starts: 4500"):
        assert key in text


def test_drop_highest_and_bad_inputs(chinchilla):
    N, D, loss = chinchilla
    with pytest.raises(ValueError, match="loss must be finite and > 0"):
        fit_chinchilla(N, D, np.where(np.arange(N.size) == 3, np.nan, loss))
    with pytest.raises(ValueError, match="loss must be finite and > 0"):
        fit_chinchilla(N, D, np.where(np.arange(N.size) == 3, -1.0, loss))
    with pytest.raises(ValueError, match="single distinct"):
        fit_chinchilla(np.full(10, 1e9), D[:10], loss[:10])
    with pytest.raises(ValueError, match="free parameters"):
        fit_chinchilla(N[:4], D[:4], loss[:4])
    with pytest.raises(ValueError, match="drop_highest"):
        fit_chinchilla(N[:8], D[:8], loss[:8], drop_highest=5)
    with pytest.raises(ValueError, match="grid"):
        fit_chinchilla(N, D, loss, grid="fine")
    with pytest.raises(ValueError, match="shape"):
        fit_chinchilla(N, D[:-1], loss)
