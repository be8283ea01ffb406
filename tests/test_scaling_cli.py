"""``sparsejax fit`` (scaling.cli.main) end to end, and the plots it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scaling import ChinchillaLaw, fit_frantar, plots
from scaling.cli import main


@pytest.mark.slow
def test_cli_on_the_chinchilla_csv(reference_data, tmp_path, capsys):
    out = tmp_path / "plots"
    code = main(
        [
            str(reference_data / "chinchilla_svg_extracted.csv"),
            "--drop-highest",
            "5",
            "--bootstrap",
            "20",
            "--out",
            str(out),
            "--loo",
            "--grid",
            "coarse",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "1.8172" in captured.out and "0.3473" in captured.out  # E and alpha
    assert "Bootstrap (20 replicates" in captured.out
    assert "bootstrap 20/20" in captured.err  # progress
    assert "N_opt ~ C^0.51" in captured.out and "leave-one-out" in captured.out
    assert "DEGENERATE" not in captured.out and "warning" not in captured.err  # bootstrap too
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["isoflop.png", "loss_vs_n.png", "predicted_vs_observed.png", "residuals.png"]


def test_cli_on_a_sweep_dir_and_bad_input(tmp_path, capsys):
    law = ChinchillaLaw(E=1.5, A=60.0, B=80.0, alpha=0.3, beta=0.25)
    i = 0
    for n in (1e5, 3e5, 1e6):
        for t in (1e7, 3e7, 1e8):
            run = tmp_path / "sweep" / f"r{i}"
            run.mkdir(parents=True)
            i += 1
            rec = {
                "status": "completed",
                "tokens": t,
                "n_avg": n * 0.5,
                "n_params": n,
                "n_active": n / 4,
                "sparsity": 0.75,
                "val_loss": float(law.predict(n * 0.5, t)),
            }
            (run / "summary.json").write_text(json.dumps(rec))
    bad = tmp_path / "sweep" / "r9"  # the trainer's summary of a diverged run
    bad.mkdir()
    rec = {"status": "diverged", "diverged_step": 40, "tokens": 1e7, "n_avg": 5e4}
    (bad / "summary.json").write_text(json.dumps({**rec, "val_loss": "nan"}))
    with pytest.warns(UserWarning, match=r"skipped 1 diverged run\(s\): r9 \(step 40"):
        assert main([str(tmp_path / "sweep"), "--bootstrap", "0", "--grid", "coarse"]) == 0
    text = capsys.readouterr().out
    assert "N = n_avg" in text and "9 points" in text
    assert main([str(tmp_path / "nowhere.csv")]) == 2
    assert capsys.readouterr().err.startswith("sparsejax: error: source must be")
    assert main([str(tmp_path / "sweep"), "--bootstrap", "1"]) == 2
    capsys.readouterr()
    (tmp_path / "file").write_text("")
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err == f"sparsejax: error: --out {tmp_path / 'file'} is not a folder\n"


def test_plots_of_a_sparse_fit(tmp_path):
    rng = np.random.default_rng(0)
    s = np.repeat([0.0, 0.5, 0.75], 12)
    n = np.tile(np.geomspace(1, 100, 4).repeat(3), 3) * (1 - s)
    d = np.tile([1.0, 3.0, 10.0], 12)
    loss = (1.3 * (1 - s) ** 0.8 + 2.0) * n**-0.4 + 0.3 * d**-0.9 + 4.5
    fit = fit_frantar(s, n, d, loss * np.exp(rng.normal(0, 0.002, s.size)), grid="coarse")
    paths = plots.plot_all(fit, tmp_path, prefix="sparse_")
    assert [p.name for p in paths] == [
        "sparse_predicted_vs_observed.png",
        "sparse_loss_vs_n.png",
        "sparse_residuals.png",
        "sparse_isoflop.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_cli_frantar_law_on_a_csv(tmp_path, reference_data, capsys):
    rng = np.random.default_rng(1)
    s = np.repeat([0.0, 0.5, 0.75], 12)
    n = np.tile(np.geomspace(1, 100, 4).repeat(3), 3) * (1 - s)
    d = np.tile([1.0, 3.0, 10.0], 12)
    loss = ((1.3 * (1 - s) ** 0.8 + 2.0) * n**-0.4 + 0.3 * d**-0.9 + 4.5) * np.exp(
        rng.normal(0, 0.002, s.size)
    )
    path = tmp_path / "sparse.csv"
    rows = ["S,N,D,loss"] + [f"{a},{b},{c},{e}" for a, b, c, e in zip(s, n, d, loss, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    assert main([str(path), "--law", "frantar", "--bootstrap", "10", "--grid", "coarse"]) == 0
    out = capsys.readouterr().out
    assert "FrantarFit" in out and "Bootstrap (10 replicates" in out
    assert main([str(reference_data / "chinchilla_svg_extracted.csv"), "--law", "frantar"]) == 2
    assert "sparsity column" in capsys.readouterr().err


def test_cli_backend_flag_is_deprecated_and_numpy_refused(tmp_path, capsys):
    """One solver implementation: ``--backend numba``/``auto`` still run (with a warning and
    the same table), ``--backend numpy`` is refused by argparse (exit 2)."""
    rng = np.random.default_rng(2)
    n, d = np.geomspace(1e7, 1e9, 6).repeat(4), np.tile(np.geomspace(1e9, 1e11, 4), 6)
    loss = (1.8 + 400 / n**0.34 + 900 / d**0.28) * np.exp(rng.normal(0, 0.003, n.size))
    path = tmp_path / "runs.csv"
    rows = "".join(f"{a},{b},{c}\n" for a, b, c in zip(n, d, loss, strict=True))
    path.write_text("N,D,loss\n" + rows)
    tables = []
    for extra in ([], ["--backend", "numba"]):
        assert main([str(path), "--grid", "coarse", "--bootstrap", "0", *extra]) == 0
        captured = capsys.readouterr()
        tables.append([ln for ln in captured.out.splitlines() if ln.startswith("  ")][:5])
        assert ("--backend is deprecated" in captured.err) == bool(extra)
    assert tables[0] == tables[1] and len(tables[0]) == 5
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--backend", "numpy"])
    assert exit_.value.code == 2 and "invalid choice: 'numpy'" in capsys.readouterr().err
