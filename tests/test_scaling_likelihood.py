"""The Huber-likelihood objective (Besiroglu et al. 2024's headline fit) and per-point weights."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats

from scaling import ChinchillaLaw, fit_chinchilla, likelihood

EPOCH_HEADLINE = {"E": 1.82, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def _read(path):
    with open(path, newline="") as fh:
        rows = [(float(r["N"]), float(r["D"]), float(r["loss"])) for r in csv.DictReader(fh)]
    return np.array(rows).T


def _epoch_nll(params, sigma, N, D, loss, delta=1e-3):
    """Their notebook's objective, written independently: -sum huber_logpdf(log L; pred, s)."""
    a, b, e, alpha, beta = params
    pred = np.log(np.exp(a - alpha * np.log(N)) + np.exp(b - beta * np.log(D)) + np.exp(e))
    x = (np.log(loss) - pred) / sigma
    rho = np.where(np.abs(x) <= delta, 0.5 * x**2, delta * (np.abs(x) - 0.5 * delta))
    z = np.sqrt(2 * np.pi) * (1 - 2 * stats.norm.sf(delta)) + 2 * np.exp(-0.5 * delta**2) / delta
    return float(np.sum(rho + np.log(z) + np.log(sigma)))


@pytest.fixture(scope="module")
def chinchilla(reference_data):
    N, D, loss = _read(reference_data / "chinchilla_svg_extracted.csv")
    keep = np.argsort(loss)[:-5]  # as they do: the 5 highest losses dropped
    return N[keep], D[keep], loss[keep]


def test_likelihood_fit_reproduces_epochs_headline(chinchilla):
    fit = fit_chinchilla(*chinchilla, grid="coarse", objective="huber_likelihood")
    for k, v in EPOCH_HEADLINE.items():  # 3 significant digits
        assert f"{getattr(fit, k):.3g}" == f"{v:.3g}", (k, getattr(fit, k))
    internal = [math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta]
    nll = _epoch_nll(internal, fit.sigma, *chinchilla)
    assert fit.objective == pytest.approx(nll, rel=1e-9)
    # sigma is the scale's maximum likelihood: nudging it either way lowers the likelihood
    for f in (0.99, 1.01):
        assert _epoch_nll(internal, fit.sigma * f, *chinchilla) > nll
    # the summed-Huber optimum is a worse likelihood, even at its own best scale
    summed = fit_chinchilla(*chinchilla, grid="coarse")
    assert f"{summed.B:.3g}" == "2.14e+03" and f"{summed.A:.3g}" == "478"
    th = [math.log(summed.A), math.log(summed.B), math.log(summed.E), summed.alpha, summed.beta]
    r = np.log(chinchilla[2]) - np.log(summed.predict(*chinchilla[:2]))
    assert _epoch_nll(th, likelihood.best_sigma(r), *chinchilla) > nll + 0.1


def test_best_sigma_solves_the_score_equation():
    r = np.random.default_rng(0).normal(0, 0.02, 50)
    for delta in (1e-3, 0.5, 50.0):
        s = likelihood.best_sigma(r, delta)
        nll = [likelihood.negative_log_likelihood(r, s * f, delta) for f in (0.999, 1, 1.001)]
        assert nll[1] < nll[0] and nll[1] < nll[2]
    # a huge delta is the Gaussian limit: sigma = RMS of the residuals
    assert likelihood.best_sigma(r, 1e6) == pytest.approx(np.sqrt(np.mean(r**2)), rel=1e-9)
    with pytest.raises(ValueError, match="all-zero"):
        likelihood.best_sigma(np.zeros(3))
    with pytest.raises(ValueError, match="asymmetry must be 0.5"):
        fit_chinchilla([1e6, 2e6, 4e6] * 2, [1e9] * 3 + [2e9] * 3, [3.0] * 6,
                       objective="huber_likelihood", asymmetry=0.3)
    with pytest.raises(ValueError, match="objective must be one of"):
        fit_chinchilla([1e6, 2e6, 4e6] * 2, [1e9] * 3 + [2e9] * 3, [3.0] * 6, objective="l2")


def _grid(seed, n_out=0):
    law = ChinchillaLaw(E=1.7, A=400.0, B=1200.0, alpha=0.34, beta=0.3)
    N = np.repeat(np.geomspace(1e7, 3e9, 4), 4)
    D = np.tile(np.geomspace(1e9, 3e11, 4), 4)
    loss = law.predict(N, D) * np.exp(np.random.default_rng(seed).normal(0, 0.005, N.size))
    loss[:n_out] *= 1.3
    return N, D, loss


def test_weights_zero_drops_a_point_and_integer_weights_duplicate_rows():
    N, D, loss = _grid(1, n_out=1)
    w = np.ones_like(N)
    w[0] = 0.0
    weighted = fit_chinchilla(N, D, loss, grid="coarse", weights=w)
    dropped = fit_chinchilla(N[1:], D[1:], loss[1:], grid="coarse")
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(weighted, k) == pytest.approx(getattr(dropped, k), rel=1e-6), k
    counts = np.arange(1, N.size + 1) % 3 + 1.0
    rep = np.repeat(np.arange(N.size), counts.astype(int))
    assert fit_chinchilla(N, D, loss, grid="coarse", weights=counts).alpha == pytest.approx(
        fit_chinchilla(N[rep], D[rep], loss[rep], grid="coarse").alpha, rel=1e-6)
    with pytest.raises(ValueError, match="one value per point"):
        fit_chinchilla(N, D, loss, weights=np.ones(3))
    with pytest.raises(ValueError, match="finite and >= 0"):
        fit_chinchilla(N, D, loss, weights=-w)
