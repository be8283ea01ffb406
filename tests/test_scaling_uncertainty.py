"""Bootstrap intervals and leave-one-out errors against brute-force refits."""

from __future__ import annotations

import numpy as np
import pytest

from scaling import ChinchillaLaw, bootstrap, fit_chinchilla, leave_one_out

LAW = ChinchillaLaw(E=1.7, A=400.0, B=1500.0, alpha=0.33, beta=0.30)


@pytest.fixture(scope="module")
def synthetic_fit():
    rng = np.random.default_rng(7)
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 3e10, 6), np.geomspace(1e9, 1e12, 6)))
    loss = LAW.predict(N, D) * np.exp(rng.normal(0.0, 0.01, N.size))
    return fit_chinchilla(N, D, loss, grid="coarse")


def test_bootstrap_replicate_equals_a_full_refit_of_the_resample(synthetic_fit):
    boot = bootstrap(synthetic_fit, n_boot=4, seed=3, chunk=2)
    rng = np.random.default_rng(3)  # the same draws, refitted from the whole grid
    n = synthetic_fit.n_points
    d = synthetic_fit.data
    for r in range(2):
        idx = rng.integers(0, n, n)
        ref = fit_chinchilla(d["N"][idx], d["D"][idx], d["loss"][idx], grid="coarse")
        np.testing.assert_allclose(boot.samples[r], list(ref.coefficients().values()), rtol=2e-3)


def test_bootstrap_intervals_cover_the_truth(synthetic_fit):
    calls = []
    boot = bootstrap(synthetic_fit, n_boot=120, chunk=40, progress=lambda *a: calls.append(a))
    assert calls == [(40, 120), (80, 120), (120, 120)]
    assert boot.samples.shape == (120, 5)
    ci = boot.ci(0.95)
    for k in ("E", "alpha", "beta"):
        lo, hi = ci[k]
        assert lo < getattr(LAW, k) < hi, k
        assert lo <= boot.estimate[k] <= hi
    assert all(v > 0 for v in boot.std().values())
    assert "95%" in repr(boot)
    with pytest.raises(ValueError, match="level"):
        boot.ci(1.5)


def test_leave_one_out_matches_refits_without_the_point(synthetic_fit):
    loo = leave_one_out(synthetic_fit)
    d = synthetic_fit.data
    n = synthetic_fit.n_points
    assert loo.predicted.shape == (n,)
    for i in (0, 17):
        keep = np.arange(n) != i
        ref = fit_chinchilla(d["N"][keep], d["D"][keep], d["loss"][keep], grid="coarse")
        assert loo.predicted[i] == pytest.approx(float(ref.predict(d["N"][i], d["D"][i])), rel=1e-4)
    lr = np.log(loo.predicted / d["loss"])
    assert loo.rmse_log == pytest.approx(np.sqrt(np.mean(lr**2)))
    assert 0.005 < loo.rmse_log < 0.03  # about the 1% noise, a bit more out of sample
