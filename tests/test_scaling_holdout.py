"""``sparsejax fit --holdout``: fit on the rest, predict the held-out runs (scaling.holdout)."""

from __future__ import annotations

import csv
import math

import pytest

from scaling import ChinchillaLaw
from scaling.cli import main
from scaling.holdout import holdout

LAW = ChinchillaLaw(E=1.5, A=60.0, B=80.0, alpha=0.3, beta=0.25)
EPS = (0.01, -0.02, 0.03)  # held-out runs: observed = law * exp(eps)


def _write(path, rows, fields):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture()
def small_csv(tmp_path):
    """9 runs exactly on LAW and 3 at a larger D off it by the factors exp(EPS)."""
    rows = []
    for n in (1e5, 3e5, 1e6):
        for d in (1e7, 3e7, 1e8):
            rows.append({"name": f"n{n:g}_d{d:g}", "N": n, "D": d, "loss": LAW.predict(n, d)})
    for n, e in zip((1e5, 3e5, 1e6), EPS, strict=True):
        rows.append({"name": f"big_n{n:g}", "N": n, "D": 3e8,
                     "loss": LAW.predict(n, 3e8) * math.exp(e)})
    return _write(tmp_path / "small.csv", rows, ["name", "N", "D", "loss"])


def test_holdout_largest_d_matches_a_hand_computation(small_csv, capsys):
    hand = math.sqrt(sum(e * e for e in EPS) / 3)  # log(pred / obs) = -eps
    assert hand == pytest.approx(0.0216025, rel=1e-5)
    for spec in ("largest-D", "big_*"):
        assert main([str(small_csv), "--holdout", spec, "--grid", "coarse"]) == 0
        out = capsys.readouterr().out
        assert "fit on 9 runs, predict 3" in out
        lines = out.splitlines()
        row = lines[next(i for i, x in enumerate(lines) if x.startswith("---")) + 1]
        assert float(row.split()[1]) == pytest.approx(hand, rel=1e-4)
        for name, e in zip(("big_n100000", "big_n300000", "big_n1e+06"), EPS, strict=True):
            line = next(x for x in out.splitlines() if x.startswith(name))
            assert float(line.split()[-1]) == pytest.approx(-e, abs=1e-5)
    # largest-N holds out the three runs of N = 1e6 (one of them off the law by eps = 0.03)
    res = holdout(str(small_csv), "largest-N", grid="coarse")[0]
    assert sorted(res.held) == ["big_n1e+06", "n1e+06_d1e+07", "n1e+06_d1e+08", "n1e+06_d3e+07"]


def test_holdout_sparse_compares_n_definitions_by_hand(tmp_path, capsys):
    """Dense runs on LAW; sparse runs on LAW at N_avg: the dense fit recovers LAW, so the
    held-out error of each N is log(LAW(N, D) / LAW(N_avg, D)), computed here by hand."""
    rows = []
    for n in (1e5, 3e5, 1e6):
        for d in (1e7, 3e7, 1e8):
            for s, rho in ((0.0, 1.0), (0.5, 0.8), (0.75, 0.6)):
                loss = LAW.predict(n * rho, d)
                rows.append({"name": f"r{len(rows)}", "tokens": d, "val_loss": loss,
                             "n_params": n, "n_avg": n * rho, "n_active": n * (1 - s),
                             "sparsity": s, "val_loss_se": 0.003})
    path = _write(tmp_path / "sweep.csv", rows, list(rows[0]))
    assert main([str(path), "--holdout", "sparse", "--compare-n", "--grid", "coarse"]) == 0
    out = capsys.readouterr().out
    sparse = [r for r in rows if r["sparsity"] > 0]
    for label, key in (("N_avg", "n_avg"), ("N_final", "n_active"), ("N_total", "n_params")):
        err = [math.log(LAW.predict(r[key], r["tokens"]) / r["val_loss"]) for r in sparse]
        hand = math.sqrt(sum(e * e for e in err) / len(err))
        line = next(x for x in out.splitlines() if x.startswith(label))
        assert float(line.split()[2 if label == "N_final" else 1]) == pytest.approx(
            hand, rel=1e-4, abs=1e-6), label
    assert "fit on 9 runs, predict 18" in out
    assert main([str(path), "--holdout", "sparse", "--weights", "se", "--grid", "coarse"]) == 0
    capsys.readouterr()


def test_holdout_bad_input_is_one_error_line(small_csv, capsys):
    for spec, msg in (("nothing*", "matches no run"), ("*", "holds out every run"),
                      ("sparse", "needs a sparsity column")):
        assert main([str(small_csv), "--holdout", spec, "--grid", "coarse"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sparsejax: error: --holdout") and msg in err
        assert err.count("\n") == 1
    assert main([str(small_csv), "--weights", "se", "--bootstrap", "0"]) == 2
    assert "val_loss_se" in capsys.readouterr().err
    assert main([str(small_csv), "--plan-sparsity", "0.5"]) == 2
    assert "--plan-sparsity needs --flops" in capsys.readouterr().err
