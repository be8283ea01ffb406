"""Approach 2 (iso-FLOP parabolas), Kaplan et al. 2020's L(N, D) and the data-constrained law
of Muennighoff et al. 2023 recover their parameters from synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from scaling import ChinchillaLaw
from scaling.data_constrained import DataConstrainedLaw, fit_data_constrained
from scaling.isoflop import fit_isoflop
from scaling.kaplan import KaplanLaw, fit_kaplan


def _isoflop_runs(loss_of, budgets=(1e18, 1e19, 1e20, 1e21), spread=(0.25, 0.5, 1, 2, 4)):
    n, d, loss = [], [], []
    for c in budgets:
        centre = 0.1 * c**0.5
        for f in spread:
            n.append(centre * f)
            d.append(c / (6 * centre * f))
            loss.append(loss_of(c, centre * f))
    return np.array(n), np.array(d), np.array(loss)


def test_isoflop_recovers_exact_parabolas_and_the_chinchilla_exponent():
    # valleys that are parabolas in log N with minima at N_opt = 0.1 C^0.5 (times 1.3)
    def parabola(c, n):
        return 2 + 10 * c**-0.1 + 0.05 * np.log(n / (0.13 * c**0.5)) ** 2

    fit = fit_isoflop(*_isoflop_runs(parabola))
    assert fit.a == pytest.approx(0.5, abs=1e-9) and fit.b == pytest.approx(0.5, abs=1e-9)
    assert fit.n_opt(1e22) == pytest.approx(0.13 * 1e11, rel=1e-8)
    assert fit.d_opt(1e22) == pytest.approx(1e22 / (6 * 0.13 * 1e11), rel=1e-8)
    assert all(b.inside for b in fit.budgets) and len(fit.budgets) == 4
    # on a Chinchilla law the parabolas approximate the valleys: a = beta / (alpha + beta)
    law = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    runs = _isoflop_runs(lambda c, n: law.isoflop(c, n), spread=(0.5, 0.7, 1, 1.4, 2))
    approx = fit_isoflop(*runs)
    assert approx.a == pytest.approx(law.exponents[0], abs=0.02)
    with pytest.raises(ValueError, match="distinct N"):
        fit_isoflop(*(x[:2] for x in runs))


def test_isoflop_rejects_a_valley_without_a_minimum():
    n, d, loss = _isoflop_runs(lambda c, n: 50 - 0.01 * np.log(n) ** 2)
    with pytest.raises(ValueError, match="does not curve upward"):
        fit_isoflop(n, d, loss)


def test_kaplan_law_recovers_the_published_coefficients():
    law = KaplanLaw(alpha_N=0.076, alpha_D=0.095, N_c=8.8e13, D_c=5.4e13)
    N = np.repeat(np.geomspace(1e5, 1e9, 6), 6)
    D = np.tile(np.geomspace(2e7, 2e10, 6), 6)
    # eq. (1.5) written out: ((N_c / N)^(a_N / a_D) + D_c / D)^a_D
    hand = ((8.8e13 / N[7]) ** (0.076 / 0.095) + 5.4e13 / D[7]) ** 0.095
    assert law.predict(N[7], D[7]) == pytest.approx(hand, rel=1e-12)
    loss = law.predict(N, D) * np.exp(np.random.default_rng(0).normal(0, 0.003, N.size))
    fit = fit_kaplan(N, D, loss, grid={"alpha_N": (0.1,), "alpha_D": (0.1,)})  # 4 starts
    assert fit.law.alpha_N == pytest.approx(0.076, rel=2e-3)
    assert fit.law.alpha_D == pytest.approx(0.095, rel=2e-3)
    assert fit.law.N_c == pytest.approx(8.8e13, rel=0.05)
    assert fit.law.D_c == pytest.approx(5.4e13, rel=0.05)


def _dc_runs(law):
    rows = []
    for u in (1e8, 1e9, 1e10):
        for f in (0.1, 1, 10, 30):
            for epochs in (0.25, 1, 4, 16, 64):
                rows.append((law.n_opt_for(u) * f, u * epochs, u))
    return np.array(rows).T


def test_data_constrained_law_recovers_r_star():
    base = ChinchillaLaw(E=1.87, A=521.0, B=1488.0, alpha=0.353, beta=0.353)
    law = DataConstrainedLaw(base, R_D=15.4, R_N=5.3)  # Muennighoff et al.'s fit
    N, D, U = _dc_runs(law)
    # eq. 5 by hand for one run: 16 epochs of U = 1e9 tokens
    i = int(np.flatnonzero((U == 1e9) & (D == 16e9))[0])
    d_eff = 1e9 + 1e9 * 15.4 * (1 - np.exp(-15 / 15.4))
    assert law.effective(N[i], D[i], U[i])[1] == pytest.approx(d_eff, rel=1e-12)
    # its U_N cap: D_opt(C) = U for the base law's compute-optimal split
    opt = base.compute_optimal(6 * law.n_opt_for(1e9) * 1e9)
    assert float(opt.D) == pytest.approx(1e9, rel=1e-9)
    loss = law.predict(N, D, U)
    fit = fit_data_constrained(N, D, U, loss, base_grid="coarse")  # base fitted too
    assert fit.law.R_D == pytest.approx(15.4, rel=1e-4)
    assert fit.law.R_N == pytest.approx(5.3, rel=1e-4)
    assert fit.law.base.alpha == pytest.approx(0.353, rel=1e-4)
    noisy = loss * np.exp(np.random.default_rng(0).normal(0, 0.002, loss.size))
    known = fit_data_constrained(N, D, U, noisy, base=base)
    assert known.law.R_D == pytest.approx(15.4, rel=0.05)
    assert known.law.R_N == pytest.approx(5.3, rel=0.05)
    with pytest.raises(ValueError, match="repeats data"):
        one = D <= U
        fit_data_constrained(N[one], D[one], U[one], loss[one], base=base)


def test_cli_fits_the_isoflop_and_kaplan_laws(tmp_path, capsys):
    from scaling.cli import main

    n, d, loss = _isoflop_runs(lambda c, n: 2 + 0.05 * np.log(n / (0.13 * c**0.5)) ** 2)
    path = tmp_path / "iso.csv"
    path.write_text("N,D,loss\n" + "".join(f"{a:.17g},{b:.17g},{c:.17g}\n" for a, b, c in zip(
        n, d, loss, strict=True)))
    assert main([str(path), "--law", "isoflop", "--flops", "1e22"]) == 0
    out = capsys.readouterr().out
    assert "N_opt ~ C^0.5000, D_opt ~ C^0.5000" in out and "N_opt 1.3e+10" in out
    assert main([str(path), "--law", "kaplan", "--holdout", "largest-D"]) == 2
    assert "not kaplan" in capsys.readouterr().err
