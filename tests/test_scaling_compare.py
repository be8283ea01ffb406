"""``sparsejax fit``: --compare-n, --fix, the degenerate warning, Frantar's default N, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scaling import ChinchillaLaw, fit_chinchilla, plots, uncertainty
from scaling.cli import main
from scaling.compare import compare_n
from scaling.plan import average_density

LAW = ChinchillaLaw(E=1.2, A=40.0, B=60.0, alpha=0.32, beta=0.27)


def _write_sweep(root, sizes, budgets, sparsities, seed=0):
    """Run dirs whose loss follows LAW in N_avg (0.3% noise); n_active is the final count."""
    rng = np.random.default_rng(seed)
    i = 0
    for n_params in sizes:
        for tokens in budgets:
            for s in sparsities:
                n_avg = n_params * average_density(s, 0.25, 0.75)
                loss = float(LAW.predict(n_avg, tokens)) * float(np.exp(rng.normal(0, 0.003)))
                run = root / f"run{i:02d}"
                run.mkdir(parents=True)
                i += 1
                rec = {"status": "completed", "tokens": tokens, "val_loss": loss,
                       "n_params": n_params, "n_active": n_params * (1 - s), "n_avg": n_avg,
                       "sparsity": s, "density": 1 - s}
                (run / "summary.json").write_text(json.dumps(rec))
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return _write_sweep(root, (2e5, 6e5, 2e6), (2e7, 8e7, 3e8), (0.0, 0.5, 0.75))


def _rmse_numpy(fit, n, d, loss):
    pred = fit.E + fit.A * n ** -fit.alpha + fit.B * d ** -fit.beta
    return float(np.sqrt(np.mean(np.log(pred / loss) ** 2)))


def test_compare_n_prints_three_rows_with_the_right_rmse(sweep, capsys):
    assert main([str(sweep), "--compare-n", "--grid", "coarse"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"27 runs from {sweep}, law chinchilla; N compared:"
    rows = {ln[:20].strip(): ln[20:].split() for ln in lines[3:6]}
    assert list(rows) == ["N_avg", "N_final (non-zero)", "N_total"]
    recs = [json.loads((p / "summary.json").read_text()) for p in sorted(sweep.iterdir())]
    d = np.array([r["tokens"] for r in recs])
    loss = np.array([r["val_loss"] for r in recs])
    for label, key in (("N_avg", "n_avg"), ("N_final (non-zero)", "n_active"),
                       ("N_total", "n_params")):
        n = np.array([r[key] for r in recs])
        ref = fit_chinchilla(n, d, loss, grid="coarse")
        objective, rmse, loo = (float(v) for v in rows[label][:3])
        assert objective == pytest.approx(ref.objective, rel=1e-3), label
        assert rmse == pytest.approx(_rmse_numpy(ref, n, d, loss), rel=1e-3), label
        assert loo >= rmse  # out of sample is no better than in sample
    # the data follow N_avg: it fits best, in and out of sample, near the 0.3% noise
    assert float(rows["N_avg"][1]) < 0.005 < float(rows["N_total"][1])
    assert "best LOO" in lines[3]


def test_compare_n_api_and_frantar_default_n(sweep, tmp_path, capsys):
    rows = compare_n(sweep, grid="coarse", n_keys=("n_active",))
    assert [r.n_key for r in rows] == ["n_active"]
    n_active = np.array(
        [json.loads((p / "summary.json").read_text())["n_active"] for p in sorted(sweep.iterdir())]
    )
    np.testing.assert_array_equal(rows[0].fit.data["N"], n_active)
    assert main([str(sweep), "--law", "frantar", "--bootstrap", "0", "--grid", "coarse"]) == 0
    out = capsys.readouterr().out
    assert "27 points" in out and "(N = n_active)" in out and "FrantarFit" in out
    assert main([str(sweep), "--law", "frantar", "--n-key", "n_avg", "--bootstrap", "0",
                 "--grid", "coarse"]) == 0
    assert "(N = n_avg)" in capsys.readouterr().out
    bare = _write_sweep(tmp_path / "bare", (2e5, 6e5), (2e7, 8e7, 3e8), (0.0,))
    rec = json.loads((bare / "run00" / "summary.json").read_text())
    del rec["n_active"]  # a summary without the final non-zero count
    (bare / "run00" / "summary.json").write_text(json.dumps(rec))
    assert main([str(bare), "--compare-n"]) == 2
    assert capsys.readouterr().err.startswith(
        "sparsejax: error: comparing N needs the summary fields n_avg, n_active, n_params"
    )


def test_compare_n_leave_one_out_folds_leave_out_each_point_once(sweep, monkeypatch):
    """The folds ``--compare-n``'s leave-one-out refits: one weight row per point, each with
    exactly one point left out (weight 0, the others 1), every point left out once; and the
    held-out prediction of point i comes from the fold that left out i (a fake refit whose law
    predicts 1 + the index of the point its fold left out)."""
    real = uncertainty.refit_weighted
    folds = []

    def spy(fit, weights, **kw):
        folds.append(np.array(weights))
        return real(fit, weights, **kw)

    monkeypatch.setattr(uncertainty, "refit_weighted", spy)
    (row,) = compare_n(sweep, grid="coarse", n_keys=("n_avg",))
    (w,) = folds
    n = row.n_points
    assert n == 27 and w.shape == (n, n) and set(np.unique(w)) == {0.0, 1.0}
    assert ((w == 0).sum(axis=1) == 1).all()  # each fold leaves out exactly one point
    assert sorted(np.argmin(w, axis=1)) == list(range(n))  # every point once

    def marked(fit, weights, **kw):  # E = 1 + the left-out index, A and B terms ~ e^-60
        left = np.argmin(weights, axis=1).astype(np.float64)
        theta = np.zeros((weights.shape[0], 5))
        theta[:, :2], theta[:, 2] = -60.0, np.log1p(left)
        return theta, np.zeros(weights.shape[0])

    monkeypatch.setattr(uncertainty, "refit_weighted", marked)
    loo = uncertainty.leave_one_out(row.fit)
    np.testing.assert_allclose(loo.predicted, np.arange(1.0, n + 1), rtol=1e-12)


def test_cli_warns_on_a_degenerate_sweep_and_fix_identifies_it(tmp_path, capsys):
    # issue 14's shape: 2 sizes x {dense, 0.5} x 2 budgets: two distinct D
    sweep = _write_sweep(tmp_path / "small", (2e5, 8e5), (6.1e5, 1.2e6), (0.0, 0.5), seed=1)
    out_dir = tmp_path / "plots"
    assert main([str(sweep), "--bootstrap", "0", "--grid", "coarse", "--out", str(out_dir)]) == 0
    cap = capsys.readouterr()
    assert "DEGENERATE: beta is not identified: D has 2 distinct value(s)" in cap.out
    assert "compute-optimal exponents: not reported for a degenerate fit" in cap.out
    assert "N_opt ~" not in cap.out
    assert "isoflop plot not written for a degenerate fit" in cap.out
    assert not (out_dir / "isoflop.png").exists()
    assert cap.err.startswith("sparsejax: warning: degenerate fit: beta is not identified")
    assert main([str(sweep), "--bootstrap", "0", "--grid", "coarse", "--fix", "E=1.2"]) == 0
    cap = capsys.readouterr()
    assert "E                    1.2  (fixed)" in cap.out and "DEGENERATE" not in cap.out
    assert "N_opt ~ C^" in cap.out and cap.err == ""
    assert main([str(sweep), "--bootstrap", "0", "--fix", "E"]) == 2
    assert capsys.readouterr().err == (
        "sparsejax: error: --fix takes NAME=VALUE (e.g. E=1.7); got 'E'\n"
    )
    assert main([str(sweep), "--bootstrap", "0", "--fix", "gamma=1"]) == 2
    assert "unknown parameter 'gamma'" in capsys.readouterr().err


def _overlaps(fig) -> list[str]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bad = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible()
                      and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    if boxes[i].overlaps(boxes[j]):
                        bad.append(f"{labels[i].get_text()} / {labels[j].get_text()}")
    return bad


def test_plots_name_n_mark_sparse_runs_and_keep_ticks_apart(sweep, tmp_path, monkeypatch):
    rows = compare_n(sweep, grid="coarse", n_keys=("n_avg",))
    fit = rows[0].fit
    s = np.array(
        [json.loads((p / "summary.json").read_text())["sparsity"] for p in sorted(sweep.iterdir())]
    )
    figs, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or save(fig, path))
    plots.plot_all(fit, tmp_path, n_key="n_avg", sparsity=s)
    assert len(figs) == 4
    for fig in figs:
        assert _overlaps(fig) == []
    ax = figs[1].axes[0]  # loss vs N
    assert ax.get_xlabel() == "N = N_avg (average parameter count over training)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["dense", "sparse, S=0.5", "sparse, S=0.75"]
    markers = {line.get_label(): line.get_marker() for line in ax.get_legend().get_lines()}
    assert markers["dense"] == "o" and markers["sparse, S=0.5"] != "o"
    assert len(ax.get_lines()) >= 9 + 3  # a fitted curve per (sparsity level, D), legend lines
    assert "N_avg" in figs[0].axes[0].get_title()  # predicted vs observed names N too
    # its log axes span < 1 decade of loss: labelled at 1-2-5 (checked above: no collisions)
    assert [t.get_text() for t in figs[0].axes[0].get_yticklabels() if t.get_text()] != []
