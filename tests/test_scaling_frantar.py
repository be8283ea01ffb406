"""The sparse law of Frantar et al. 2023 fitted to their own ViT and T5 runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from scaling import fit_frantar


@pytest.fixture(scope="module")
def vit(reference_data):
    raw = json.loads((reference_data / "frantar_sparse_vit.json").read_text())
    keys = sorted(raw["scale"], key=int)
    col = lambda name: np.array([float(raw[name][k]) for k in keys])
    s = col("sparsity")
    # as in their notebook: non-zero parameters in millions, examples in billions
    n = 12 * (12 * 768**2) * col("scale") * (1 - s) / 1e6
    return s, n, col("total_examples") / 1e9, col("val-loss")


def test_vit_fit_reproduces_the_published_notebook(vit):
    # their recipe for ViT: mean Huber(0.01) on linear residuals; their best of 25 BFGS runs:
    # coefs [1.30485411 0.82101251 2.07506343 0.39222675 0.27818217 0.88979104 4.51669257],
    # loss 0.0004929087939147767
    fit = fit_frantar(*vit, space="linear", huber_delta=0.01, grid="coarse")
    published = [1.30485411, 0.82101251, 2.07506343, 0.39222675, 0.27818217, 0.88979104, 4.51669257]
    np.testing.assert_allclose(list(fit.coefficients().values()), published, rtol=2e-3)
    mean = fit.objective / fit.n_points
    assert mean <= 0.0004929087939147767 * (1 + 1e-9)
    assert mean == pytest.approx(0.0004929087939147767, rel=1e-5)
    assert not fit.degenerate, fit.reasons


def test_vit_log_space_fit_is_sensible(vit):
    s, n, d, loss = vit
    fit = fit_frantar(s, n, d, loss, grid="coarse")
    rel = fit.predict(s, n, d) / loss - 1
    assert np.sqrt(np.mean(rel**2)) < 0.015 and np.median(np.abs(rel)) < 0.01
    # close to the linear-space fit of the notebook
    assert fit.d == pytest.approx(0.392, rel=0.03) and fit.g == pytest.approx(4.517, rel=0.01)
    # sparsity helps at equal non-zero count (b > 0) and exponents are positive
    assert fit.b > 0 and fit.d > 0 and fit.f > 0
    assert fit.law.at_sparsity(0.0).E == pytest.approx(fit.g)


def test_t5_fit_is_sensible(reference_data):
    with open(reference_data / "frantar_sparse_t5.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    s = np.array([float(r["sparsity"]) for r in rows])
    scale = np.array([float(r["scale"]) for r in rows])
    steps = np.array([float(r["steps"]) for r in rows])
    loss = np.array([float(r["val-loss"]) for r in rows])
    n = scale * (1 - s)  # non-zero parameters, in units of the base model
    fit = fit_frantar(s, n, steps / 1e5, loss, grid="coarse")
    rel = fit.predict(s, n, steps / 1e5) / loss - 1
    assert np.sqrt(np.mean(rel**2)) < 0.01
    assert 0 < fit.d < 2 and fit.g < loss.min()
    # the fit's loss at a fixed non-zero count falls with sparsity, as in their Figure 1
    pred = fit.predict(np.array([0.0, 0.5, 0.75]), np.full(3, n.min()), np.full(3, 2.5))
    assert np.all(np.diff(pred) < 0)
