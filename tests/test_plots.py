"""What a researcher looks at: ``sparsejax.results.sweep_frame``, ``sparsejax plot`` (a run's
curve, a sweep's runs grouped by its axes) and the fit plots of ``scaling.plots`` (units,
error bars, titles and labels inside the figure, the fitted range on iso-FLOP curves). Sweeps
here are hand-made run dirs (json and metrics), never trained."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.text import Text

import scaling
from scaling import cli as scaling_cli
from scaling import plots
from sparsejax import cli, errors, results
from sparsejax.run.rundir import RunDir, SweepDir

AXES = {"a": ("nano", 0.0, 4), "b": ("nano", 0.5, 8), "c": ("micro", 0.0, 4),
        "d": ("micro", 0.5, 8)}


def _run(root, name, size, final, steps, *, source="", status="completed", logged=True):
    run = RunDir(root / name).create()
    run.write_config({"data": {"source": source}, "model": {"size": size}})
    loss = 3.0 - 0.1 * steps - (0.2 if size == "micro" else 0.0)
    run.write_summary({"status": status, "step": steps, "val_loss": "nan" if status ==
                       "diverged" else loss, "val_loss_se": 0.01, "tokens": 64 * steps,
                       "n_avg": 1000.0 * (1 - final / 2), "history": [1, 2]})
    if logged:
        log = run.metrics_log(resume_step=0)
        for step in range(2, steps + 1, 2):
            rec = {"step": step, "tokens": 64 * step, "flops": 1e6 * step,
                   "train_loss": 4.0 - 0.1 * step, "sparsity": final * step / steps}
            if step % 4 == 0:
                rec.update(val_loss=4.1 - 0.1 * step, val_loss_se=0.02)
            log.write(rec)
        log.close()
    return run


def _sweep(tmp_path, source=""):
    """Four completed runs (size x sparsity, steps following sparsity), a pending one,
    sweep.json listing them all."""
    root = tmp_path / "sweep"
    entries = []
    for name, (size, final, steps) in {**AXES, "e": ("micro", 0.5, 16)}.items():
        overrides = {"model.size": size, "sparsity.final": final, "train.steps": steps,
                     "sparsity.method": "gradual" if final else "dense", "eval.every": 4}
        status = "pending" if name == "e" else "completed"
        entries.append({"name": name, "overrides": overrides, "status": status})
        if status == "completed":
            _run(root, name, size, final, steps, source=source)
    SweepDir(root).write_sweep({"recipe": "hand-made", "runs": entries})
    return root


# ------------------------------------------------------------------------------ sweep_frame
def test_sweep_frame_one_row_per_run_with_overrides_summary_and_status(tmp_path):
    root = _sweep(tmp_path)
    _run(root, "f", "nano", 0.0, 4, status="diverged")  # a run dir sweep.json does not list
    df = results.sweep_frame(root)
    assert list(df.index) == ["a", "b", "c", "d", "e", "f"] and df.index.name == "run"
    assert list(df.columns[:6]) == ["status", "eval.every", "model.size", "sparsity.final",
                                    "sparsity.method", "train.steps"]
    assert list(df["status"]) == ["completed"] * 4 + ["pending", "diverged"]
    assert list(df["model.size"][:5]) == ["nano", "nano", "micro", "micro", "micro"]
    assert df.loc["b", "val_loss"] == pytest.approx(2.2) and df.loc["b", "n_avg"] == 750.0
    assert math.isnan(df.loc["f", "val_loss"])  # the "nan" string, as a float
    assert math.isnan(df.loc["e", "val_loss"])  # pending: no summary
    assert "history" not in df.columns  # a list is no table cell
    assert df.groupby("model.size")["val_loss"].min().to_dict() == pytest.approx(
        {"micro": 2.0, "nano": 2.2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.InputError, match="empty is not a sweep dir"):
        results.sweep_frame(tmp_path / "empty")


# ----------------------------------------------------------------------- curves and figures
def test_a_sweeps_curves_are_grouped_by_its_axes(tmp_path):
    curves = results.read_curves(_sweep(tmp_path), "val_loss", "tokens")
    # sparsity.method groups the runs as sparsity.final does: not an axis of its own
    assert curves.axes == ["model.size", "sparsity.final", "train.steps"]
    assert [c.name for c in curves.curves] == ["a", "b", "c", "d"]
    assert curves.skipped == ["e (nothing logged yet)"] and curves.unit == "nats/byte"
    b = curves.curves[1]
    np.testing.assert_array_equal(b.x, [256.0, 512.0])  # the records with a val_loss
    np.testing.assert_allclose(b.y, [3.7, 3.3])
    np.testing.assert_array_equal(b.se, [0.02, 0.02])
    assert b.axes == {"model.size": "nano", "sparsity.final": 0.5, "train.steps": 8}
    ax = results.figure(curves).axes[0]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    colours = [to_rgba(ln.get_color()) for ln in lines]
    assert colours[0] == colours[1] != colours[2] == colours[3]  # colour: size
    assert [ln.get_linestyle() for ln in lines] == ["-", "--", "-", "--"]  # style: sparsity
    assert lines[0].get_marker() != lines[1].get_marker()  # marker: steps
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["size=nano", "size=micro", "sparsity=0.0", "sparsity=0.5", "steps=4",
                      "steps=8"]
    assert ax.get_ylabel() == "validation loss (nats/byte)" and ax.get_xlabel() == "tokens seen"
    assert len(ax.collections) == 4  # a ± 1 SE band per run


def test_a_runs_curve_and_the_unit_of_token_data(tmp_path):
    run = _run(tmp_path, "r", "nano", 0.5, 8, source="/data/tokens.bin")
    curves = results.read_curves(run, "train_loss", "step")
    assert curves.kind == "run" and curves.unit == "nats/token"
    np.testing.assert_array_equal(curves.curves[0].x, [2, 4, 6, 8])
    ax = results.figure(curves).axes[0]
    assert ax.get_ylabel() == "loss (nats/token)"  # with the validation loss beside it
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training loss",
                                                                    "validation loss"]
    sparsity = results.figure(results.read_curves(run, "sparsity", "flops")).axes[0]
    assert sparsity.get_ylabel().startswith("sparsity") and sparsity.get_xscale() == "log"


def test_runs_without_axes_are_told_apart_by_name_and_units_must_agree(tmp_path):
    for name in ("x", "y"):  # a folder of run dirs, no sweep.json (a soup's, a copied sweep)
        _run(tmp_path, name, "nano", 0.0, 4)
    ax = results.figure(results.read_curves(tmp_path, "train_loss", "step")).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x", "y"]
    assert len({to_rgba(ln.get_color()) for ln in ax.get_lines() if len(ln.get_xdata())}) == 2
    _run(tmp_path, "z", "nano", 0.0, 4, source="tokens.bin")
    with pytest.raises(errors.InputError, match="different units .*nats/token: z"):
        results.read_curves(tmp_path, "val_loss", "step")
    assert results.read_curves(tmp_path, "sparsity", "step").unit is None  # no loss: no unit


def test_plot_command_writes_the_figure_and_names_bad_input(tmp_path, capsys, monkeypatch):
    root = _sweep(tmp_path)
    out = tmp_path / "figs" / "sweep.png"
    assert cli.main(["plot", str(root), "--metric", "sparsity", "--x", "tokens", "--out",
                     str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "left out 1 run(s): e (nothing logged yet)" in text and f"wrote {out}" in text
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plot", str(root / "a")]) == 0
    assert (tmp_path / "a_val_loss_vs_step.png").is_file()
    capsys.readouterr()
    empty = _run(tmp_path, "empty", "nano", 0.0, 4, logged=False)
    (tmp_path / "plain").mkdir()
    for argv, pieces in [
        ([str(root / "a"), "--metric", "mfu"], ["'mfu'", "it logged: val_loss, train_loss"]),
        ([str(root), "--metric", "mfu"], ["no run of sweep", "'mfu'", "a (no 'mfu')"]),
        ([str(empty.path)], ["no logged metrics yet", "first log step"]),
        ([str(tmp_path / "plain")], ["neither a run dir", "nor a sweep dir"]),
        ([str(tmp_path / "missing")], ["missing does not exist"]),
        ([str(root), "--metric", "loss"], ["--metric", "invalid choice"]),
        ([str(root), "--out", str(tmp_path / "x.txt")], ["--out", "image format"]),
    ]:
        assert cli.main(["plot", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sparsejax: error: "), err
        for piece in pieces:
            assert piece in err[0], err[0]


# --------------------------------------------------------------------------------- fit plots
def _drawn_texts(fig: Figure) -> list[Text]:
    """Every text the figure draws: titles, axis labels, legends, and the tick labels of the
    ticks within each axis's view (matplotlib keeps others it does not draw)."""
    ticks, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                labels = (tick.label1, tick.label2)
                ticks.update(id(t) for t in labels)
                if lo <= tick.get_loc() <= hi:
                    drawn += [t for t in labels if t.get_visible()]
    drawn += [t for t in fig.findobj(Text) if id(t) not in ticks and t.get_visible()]
    return [t for t in drawn if t.get_text().strip()]


def _outside(fig: Figure) -> list[str]:
    """The texts (titles, labels, ticks, legends) the renderer puts outside the figure."""
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    bad = []
    for t in _drawn_texts(fig):
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 0.5 or e.x1 > box.x1 + 0.5 or e.y0 < box.y0 - 0.5 or (
                e.y1 > box.y1 + 0.5):
            bad.append(t.get_text())
    return bad


def test_the_fit_check_sees_a_cut_title():
    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    fig.add_subplot().set_title("residuals (rms 0.0123); N = N_avg (average parameter count "
                                "over training)  [DEGENERATE FIT]")
    assert _outside(fig) != []


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """A sweep dir of 16 hand-made runs following a Chinchilla law (N 2e4 to 1.2e5, half of
    them pruned, each with its val_loss_se, on the byte corpus), and a degenerate fit of 8 of
    the points (two distinct D)."""
    law = scaling.ChinchillaLaw(E=1.2, A=40.0, B=60.0, alpha=0.32, beta=0.27)
    rng = np.random.default_rng(0)
    n = np.repeat(np.geomspace(2e4, 1.2e5, 4), 4)
    d = np.tile(np.geomspace(2e5, 2e6, 4), 4)
    loss = law.predict(n, d) * np.exp(rng.normal(0, 0.004, n.size))
    s = np.tile([0.0, 0.5], 8)
    root = tmp_path_factory.mktemp("fit") / "sweep"
    for i in range(n.size):
        run = RunDir(root / f"r{i:02d}").create()
        run.write_config({"data": {"source": ""}})
        run.write_summary({"status": "completed", "tokens": d[i], "n_avg": n[i],
                           "val_loss": loss[i], "val_loss_se": 0.003 * loss[i],
                           "sparsity": s[i]})
    keep = np.isin(d, d[:2])
    bad = scaling.fit_chinchilla(n[keep], d[keep], loss[keep], grid="coarse")
    return root, bad


def _capture(monkeypatch) -> dict[str, Figure]:
    figs: dict[str, Figure] = {}
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.update({path.stem: fig}) or
                        save(fig, path))
    return figs


@pytest.mark.slow
def test_fit_plots_fit_their_figures_with_units_error_bars_and_ranges(fits, tmp_path,
                                                                     monkeypatch, capsys):
    root, bad = fits
    figs = _capture(monkeypatch)  # sparsejax fit SWEEP --out DIR: the units and SE of the runs
    assert scaling_cli.main([str(root), "--bootstrap", "0", "--grid", "coarse", "--out",
                             str(tmp_path)]) == 0
    assert "DEGENERATE" not in capsys.readouterr().out and len(figs) == 4
    for name, fig in figs.items():
        assert _outside(fig) == [], name
    pvo = figs["predicted_vs_observed"].axes[0]
    assert pvo.get_xlabel() == "predicted loss (nats/byte)"
    assert pvo.get_ylabel() == "observed loss (nats/byte)"
    assert any(isinstance(c, ErrorbarContainer) for c in pvo.containers)
    # the legend's markers are grey: colour is the D colourbar's alone
    legend = pvo.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["dense", "sparse, S=0.5"]
    assert {to_rgba(h.get_color()) for h in legend.legend_handles} == {to_rgba("0.35")}
    assert figs["predicted_vs_observed"].axes[1].get_ylabel() == "D (tokens), colour"
    assert figs["loss_vs_n"].axes[0].get_ylabel() == "loss (nats/byte)"
    assert any(isinstance(c, ErrorbarContainer) for c in figs["residuals"].axes[0].containers)
    iso = figs["isoflop"].axes[0]
    assert iso.get_ylabel() == "predicted loss (nats/byte)"
    (span,) = [p for p in iso.patches]  # the fitted N range, shaded
    x0, x1 = span.get_x(), span.get_x() + span.get_width()
    assert (x0, x1) == pytest.approx((2e4, 1.2e5))
    solid = [ln for ln in iso.get_lines() if ln.get_linewidth() == 2.2 and len(ln.get_xdata())]
    assert len(solid) == 6  # one per budget (an extreme budget may have no point inside)
    inside = [np.asarray(ln.get_xdata())[np.isfinite(np.asarray(ln.get_ydata(), float))]
              for ln in solid]
    assert sum(x.size > 0 for x in inside) >= 4
    for x in inside:  # solid only where N and D = C / 6N lie in the fitted data
        assert ((x >= 2e4 * (1 - 1e-9)) & (x <= 1.2e5 * (1 + 1e-9))).all()
    dashed = [ln for ln in iso.get_lines() if ln.get_linestyle() == "--"]
    assert any(np.asarray(ln.get_xdata()).min() < 2e4 for ln in dashed)  # extrapolated
    # a degenerate fit: the mark is its own title line; no unit given: "loss"
    figs = _capture(monkeypatch)
    plots.plot_all(bad, tmp_path / "bad", force=True)
    assert len(figs) == 4
    for name, fig in figs.items():
        assert _outside(fig) == [], name
        assert fig.axes[0].get_title().startswith("DEGENERATE FIT"), name
    assert figs["residuals"].axes[0].get_title().count("\n") == 1
    assert figs["predicted_vs_observed"].axes[0].get_ylabel() == "observed loss"
    assert figs["isoflop"].axes[0].get_ylabel() == "predicted loss"


def test_point_info_reads_the_sweeps_errors_and_unit(tmp_path, reference_data):
    root = _sweep(tmp_path)
    info = plots.point_info(root, ["a", "c"])
    np.testing.assert_array_equal(info.loss_se, [0.01, 0.01])
    assert info.unit == "nats/byte"
    csv = plots.point_info(reference_data / "chinchilla_svg_extracted.csv", ["0", "1"])
    assert csv == (None, None)
    assert plots.loss_unit({"source": "x/tokens.BIN"}) == "nats/token"
    assert plots.loss_unit({"source": "stdlib-tests"}) == "nats/byte"
    (tmp_path / "books.txt").write_text("text")
    assert plots.loss_unit({"source": str(tmp_path / "books.txt")}) == "nats/byte"
    assert plots.loss_unit({"source": str(tmp_path)}) == "nats/byte"  # a folder of text
    for kind, unit in (("bytes", "nats/byte"), ("bpe", "nats/token")):  # a prepared folder
        (tmp_path / kind).mkdir()
        (tmp_path / kind / plots.PREPARED_METADATA).write_text(
            f'{{"format": "sparsejax-tokens", "tokenizer": {{"kind": "{kind}"}}}}')
        assert plots.loss_unit({"source": str(tmp_path / kind)}) == unit
    assert plots.loss_unit({"source": str(tmp_path / "elsewhere")}) is None  # cannot tell
    assert plots.loss_unit(None) is None
