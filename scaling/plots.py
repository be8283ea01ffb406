"""Diagnostic plots of fitted laws, written to files (matplotlib's Agg canvas, no pyplot state).

Each function takes a ``ChinchillaFit`` or ``FrantarFit`` (their ``data`` holds the fitted
points), writes one PNG and returns its path; ``plot_all`` writes every plot that applies.
Every plot names the parameter count used as N (``n_key``: ``n_avg``, the average count over
training of Jin et al. 2025; ``n_active``, the final non-zero count of Frantar et al. 2023;
``n_params``, the total), marks dense runs (sparsity 0: circles) apart from sparse ones
(another marker per sparsity level, in a grey legend of its own, apart from the colours), and
labels log axes at decades (or at 1-2-5 within a decade) with minor ticks unlabelled, so tick
labels never overlap. Sparsity comes from the fit (Frantar's law) or ``sparsity=`` (the sweep's
final sparsity per run).

Every loss axis carries the loss's unit (``unit``: ``nats/byte`` for a byte-level corpus,
``nats/token`` for token ids; :func:`loss_unit` reads it from a run config's data section, and
:func:`point_info` from a sweep dir's runs); a source that does not say (a CSV, a run whose data
is not on this machine) labels the axis plain "loss". ``loss_se`` (each point's
``val_loss_se``) draws error bars. Extrapolated curves (iso-FLOP) are solid only where both N
and D lie within the fitted points' ranges, and the fitted N range is shaded. Titles are
wrapped to the figure's width.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

N_LABELS = {
    "n_avg": "N = N_avg (average parameter count over training)",
    "n_active": "N = final non-zero parameters",
    "n_params": "N = total parameters",
    "N": "N (as given)",
}
N_SHORT = {"n_avg": "N = N_avg", "n_active": "N = non-zero params", "n_params": "N = total params",
           "N": "N as given"}
UNITS = ("nats/byte", "nats/token")
_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
_GREY = "0.35"


# ------------------------------------------------------------------------ units and errors
# a prepared token folder's metadata (``sparsejax data prepare``): its tokenizer's ``kind`` says
# whether the model reads bytes; scaling reads it as a file (it imports nothing of sparsejax)
PREPARED_METADATA = "sparsejax-data.json"
BUILT_IN_SOURCES = ("", "stdlib-tests")  # the standard library's bytes


def loss_unit(data: Mapping[str, Any] | None) -> str | None:
    """The unit of a run's losses from its config's ``data`` section: ``"nats/byte"`` when the
    model reads bytes (the built-in corpus, a text file, a folder of text files, a prepared
    folder whose tokenizer is ``bytes``), ``"nats/token"`` when it reads token ids (a
    ``uint16`` ``.bin``, a prepared folder with another tokenizer). ``None`` when nothing says:
    no data section, or a source that is neither a ``.bin`` nor on this machine (a prepared
    folder cannot be told from a text folder without its metadata).

    >>> loss_unit({"source": ""}), loss_unit({"source": "corpus/tokens.bin"})
    ('nats/byte', 'nats/token')
    """
    if data is None:
        return None
    source = str(data.get("source") or "")
    if source in BUILT_IN_SOURCES:
        return "nats/byte"
    path = Path(source).expanduser()
    if path.suffix.lower() == ".bin":
        return "nats/token"
    if (path / PREPARED_METADATA).is_file():
        try:
            kind = json.loads((path / PREPARED_METADATA).read_text())["tokenizer"]["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable metadata: training would have refused it
        return "nats/byte" if kind == "bytes" else "nats/token"
    return "nats/byte" if path.exists() else None


def loss_label(what: str, unit: str | None) -> str:
    """An axis label: ``"observed loss (nats/byte)"``, or ``what`` alone when no unit is known."""
    return f"{what} ({unit})" if unit else what


class PointInfo(NamedTuple):
    """What a fit's source says beyond ``N, D, loss``: each point's standard error and the
    loss unit (``None`` where the source does not say)."""

    loss_se: np.ndarray | None  # shape=(n,), float64: val_loss_se per point
    unit: str | None  # "nats/byte", "nats/token" or None


def point_info(source: Any, names: Sequence[str]) -> PointInfo:
    """Each named point's ``val_loss_se`` and the loss unit, read from ``source``: a sweep dir
    (each run's ``summary.json`` and ``config.json``; ``names`` are its run dirs, the fitted
    ones), a CSV file or a DataFrame (a ``val_loss_se`` or ``loss_se`` column, rows by index;
    their unit is unknown). A sweep whose runs use different units gets a warning and no
    unit."""
    if hasattr(source, "columns"):  # a DataFrame
        cols = {str(c): list(source[c]) for c in source.columns}
        return PointInfo(_se_column(cols, names), None)
    path = Path(source)
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        cols = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {})}
        return PointInfo(_se_column(cols, names), None)
    se, units = [], {}
    for name in names:
        run = path / name
        summary = json.loads((run / "summary.json").read_text())
        config_file = run / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        value = summary.get("val_loss_se")
        se.append(math.nan if value is None else float(value))
        units.setdefault(loss_unit(config.get("data")), []).append(name)
    if len(units) > 1:
        warnings.warn("the runs' losses have different units, so the plots name none: " +
                      "; ".join(f"{u or 'unknown'}: {', '.join(n[:3])}"
                                f"{' ...' if len(n) > 3 else ''}" for u, n in units.items()),
                      stacklevel=2)
    arr = np.asarray(se, np.float64)
    return PointInfo(None if np.isnan(arr).all() else arr,
                     next(iter(units)) if len(units) == 1 else None)


def _se_column(cols: dict[str, list], names: Sequence[str]) -> np.ndarray | None:
    key = next((k for k in ("val_loss_se", "loss_se") if k in cols), None)
    if key is None:
        return None
    values = cols[key]
    return np.asarray([math.nan if values[int(i)] in (None, "") else float(values[int(i)])
                       for i in names], np.float64)


# ---------------------------------------------------------------------------------- helpers
def n_label(n_key: str | None, fit=None) -> str:
    """Axis label naming which N a fit used."""
    if n_key is None:
        n_key = "n_active" if fit is not None and "S" in fit.data else "N"
    return N_LABELS.get(n_key, f"N = {n_key}")


def _n_short(n_key: str | None, fit) -> str:
    if n_key is None:
        n_key = "n_active" if "S" in fit.data else "N"
    return N_SHORT.get(n_key, f"N = {n_key}")


def _sparsity(fit, sparsity) -> np.ndarray:
    d = fit.data
    if "S" in d:
        return np.asarray(d["S"], np.float64)
    if sparsity is None:
        return np.zeros_like(d["loss"])
    s = np.asarray(sparsity, np.float64)
    if s.shape != d["loss"].shape:
        raise ValueError(
            f"sparsity must have one value per fitted point {d['loss'].shape}; got {s.shape}"
        )
    return s


def _se(fit, loss_se) -> np.ndarray | None:
    if loss_se is None:
        return None
    se = np.asarray(loss_se, np.float64)
    if se.shape != fit.data["loss"].shape:
        raise ValueError(
            f"loss_se must have one value per fitted point {fit.data['loss'].shape}; got "
            f"{se.shape}")
    return None if np.isnan(se).all() else np.nan_to_num(se, nan=0.0)


def _levels(s: np.ndarray) -> list[tuple[np.ndarray, str, str]]:
    """(mask, marker, label) per sparsity level; dense (0) first with circles."""
    out = []
    for i, level in enumerate(np.unique(np.round(s, 3))):
        mask = np.round(s, 3) == level
        label = "dense" if level == 0 else f"sparse, S={level:g}"
        marker = "o" if level == 0 else _MARKERS[1 + (i - 1) % (len(_MARKERS) - 1)]
        out.append((mask, marker, label))
    return out


def log_axis(ax, which: str, lo: float, hi: float) -> None:
    """Log scale on ``which`` ("x"/"y") over [lo, hi] with labels that cannot overlap: at
    decades (at most 6 labels) when the range spans >= 2 of them, else at 1, 2, 5 x 10^k."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    (ax.set_xlim if which == "x" else ax.set_ylim)(lo, hi)
    if np.log10(hi / lo) >= 2:
        axis.set_major_locator(LogLocator(base=10.0, numticks=7))
    else:
        axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0), numticks=12))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_locator(LogLocator(base=10.0, subs=np.arange(2, 10) * 0.1, numticks=12))
    axis.set_minor_formatter(NullFormatter())


def _pad(lo: float, hi: float, f: float = 1.15) -> tuple[float, float]:
    return lo / f, hi * f


def _predict_points(fit) -> np.ndarray:
    d = fit.data
    return fit.predict(d["S"], d["N"], d["D"]) if "S" in d else fit.predict(d["N"], d["D"])


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _title(ax, fit, lines: Sequence[str], fontsize: float = 9) -> None:
    """Title lines, each wrapped to the figure's width; a degenerate fit gets a first line
    saying so (red), so no suffix is ever cut off."""
    width_pt = ax.figure.get_figwidth() * 72
    chars = max(20, int(width_pt / (0.55 * fontsize)) - 4)
    text = [line for raw in lines for line in textwrap.wrap(raw, chars)]
    if getattr(fit, "degenerate", False):
        text.insert(0, "DEGENERATE FIT (see its reasons)")
        ax.set_title("\n".join(text), fontsize=fontsize, color="firebrick")
        return
    ax.set_title("\n".join(text), fontsize=fontsize)


def _level_legend(ax, levels, **kw):
    """A legend of the sparsity levels' markers, in grey (the colours mean something else)."""
    handles = [Line2D([], [], ls="none", marker=m, color=_GREY, label=lab)
               for _, m, lab in levels]
    return ax.legend(handles=handles, title="sparsity", fontsize=7, title_fontsize=7, **kw)


# ------------------------------------------------------------------------------------ plots
def predicted_vs_observed(fit, path, *, n_key=None, sparsity=None, loss_se=None,
                          unit=None) -> Path:
    """Observed against predicted loss (with ``loss_se`` error bars), coloured by D (the
    colourbar), a grey marker per sparsity level (the legend), the identity line."""
    d = fit.data
    obs, pred = d["loss"], _predict_points(fit)
    s, se = _sparsity(fit, sparsity), _se(fit, loss_se)
    fig = _figure(6.0, 5.0)
    ax = fig.add_subplot()
    d_lo, d_hi = float(d["D"].min()), float(d["D"].max())
    norm = LogNorm(d_lo, d_hi if d_hi > d_lo else d_lo * 1.01)
    if se is not None:
        ax.errorbar(pred, obs, yerr=se, fmt="none", ecolor="0.6", lw=0.8, zorder=1)
    sc = None
    levels = _levels(s)
    for mask, marker, _ in levels:
        sc = ax.scatter(pred[mask], obs[mask], c=d["D"][mask], s=18, marker=marker,
                        cmap="viridis", norm=norm, zorder=2)
    top = obs + (se if se is not None else 0.0)
    lo, hi = _pad(min(obs.min(), pred.min()), max(top.max(), pred.max()), 1.02)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = observed")
    log_axis(ax, "x", lo, hi)
    log_axis(ax, "y", lo, hi)
    ax.set(xlabel=loss_label("predicted loss", unit), ylabel=loss_label("observed loss", unit))
    _title(ax, fit, [f"{type(fit).__name__}: predicted vs observed, {_n_short(n_key, fit)}"]
           + (["error bars: 1 standard error of the observed loss"] if se is not None else []))
    _level_legend(ax, levels, loc="upper left")
    fig.colorbar(sc, ax=ax, label="D (tokens), colour")
    return _save(fig, Path(path))


def residuals(fit, path, *, n_key=None, sparsity=None, loss_se=None, unit=None) -> Path:
    """log(predicted / observed) against C = 6 N D, a colour and marker per sparsity level;
    error bars: the standard error of log(observed), ``loss_se / loss``."""
    del unit  # a log ratio has no unit
    d = fit.data
    res = np.log(_predict_points(fit) / d["loss"])
    s, se = _sparsity(fit, sparsity), _se(fit, loss_se)
    fig = _figure(6.0, 4.4)
    ax = fig.add_subplot()
    flops = 6 * d["N"] * d["D"]
    for i, (mask, marker, label) in enumerate(_levels(s)):
        if se is not None:
            ax.errorbar(flops[mask], res[mask], yerr=(se / d["loss"])[mask], fmt="none",
                        ecolor=f"C{i}", alpha=0.5, lw=0.8)
        ax.scatter(flops[mask], res[mask], s=18, marker=marker, color=f"C{i}", label=label)
    ax.axhline(0.0, color="k", lw=1)
    log_axis(ax, "x", *_pad(flops.min(), flops.max()))
    ax.set(xlabel="C = 6 N D (FLOPs)", ylabel="log(predicted / observed loss)")
    _title(ax, fit, [f"residuals of {type(fit).__name__}: rms {np.sqrt(np.mean(res**2)):.3g}, "
                     f"{_n_short(n_key, fit)}"])
    ax.legend(fontsize=7, title="sparsity", title_fontsize=7)
    return _save(fig, Path(path))


def _d_groups(log_d: np.ndarray, n_groups: int) -> np.ndarray:
    levels = np.unique(log_d)
    if levels.size <= n_groups:
        return np.searchsorted(levels, log_d)
    edges = np.quantile(log_d, np.linspace(0, 1, n_groups + 1))
    return np.clip(np.searchsorted(edges, log_d, side="right") - 1, 0, n_groups - 1)


def loss_vs_n(fit, path, *, n_groups: int = 4, n_key=None, sparsity=None, loss_se=None,
              unit=None) -> Path:
    """Loss against N: a marker per sparsity level (dense: circles), a colour per group of D,
    and the fitted curve for each (sparsity level, D group) over that level's range of N."""
    d = fit.data
    s, se = _sparsity(fit, sparsity), _se(fit, loss_se)
    groups = _d_groups(np.log(d["D"]), n_groups)
    fig = _figure(7.4, 4.8)
    ax = fig.add_subplot()
    styles = ("-", "--", ":", "-.")
    for li, (mask, marker, _) in enumerate(_levels(s)):
        level = float(np.median(s[mask]))
        for g in np.unique(groups):
            m = mask & (groups == g)
            if not m.any():
                continue
            col = f"C{int(g) % 10}"
            dm = float(np.exp(np.median(np.log(d["D"][m]))))
            n_line = np.geomspace(*_pad(d["N"][m].min(), d["N"][m].max(), 1.3), 60)
            if "S" in d:
                curve = fit.predict(np.full_like(n_line, level), n_line, np.full_like(n_line, dm))
            else:
                curve = fit.predict(n_line, np.full_like(n_line, dm))
            if se is not None:
                ax.errorbar(d["N"][m], d["loss"][m], yerr=se[m], fmt="none", ecolor=col,
                            alpha=0.6, lw=0.8)
            ax.scatter(d["N"][m], d["loss"][m], s=22, marker=marker, color=col, alpha=0.8)
            ax.plot(n_line, curve, color=col, ls=styles[li % len(styles)], lw=1.2)
    for li, (_, marker, label) in enumerate(_levels(s)):  # legend: marker and line style
        ax.plot([], [], color=_GREY, marker=marker, ls=styles[li % len(styles)], label=label)
    for g in np.unique(groups):
        dm = float(np.exp(np.median(np.log(d["D"][groups == g]))))
        ax.plot([], [], color=f"C{int(g) % 10}", lw=4, label=f"D ~ {dm:.2g} tokens")
    log_axis(ax, "x", *_pad(d["N"].min(), d["N"].max(), 1.4))
    top = d["loss"] + (se if se is not None else 0.0)
    bottom = d["loss"] - (se if se is not None else 0.0)
    log_axis(ax, "y", *_pad(bottom.min(), top.max(), 1.03))
    ax.set(xlabel=n_label(n_key, fit), ylabel=loss_label("loss", unit))
    _title(ax, fit, ["loss vs N: the fitted law per sparsity level (marker, line style) and "
                     "D (colour)"] + (["error bars: 1 standard error"] if se is not None else []))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, Path(path))


def isoflop(fit, path, *, n_budgets: int = 6, sparsity: float = 0.0, n_key=None,
            unit=None) -> Path:
    """Predicted loss along iso-FLOP lines (C = 6 N D) with the compute-optimal N marked;
    each curve solid where its N and D = C / 6N lie within the fitted points' ranges, dashed
    where it extrapolates, and the fitted N range shaded."""
    d = fit.data
    law = fit.law.at_sparsity(sparsity) if "S" in d else fit.law
    c_all = 6 * d["N"] * d["D"]
    n_min, n_max = float(d["N"].min()), float(d["N"].max())
    d_min, d_max = float(d["D"].min()), float(d["D"].max())
    budgets = np.geomspace(c_all.min(), c_all.max(), n_budgets)
    fig = _figure(7.4, 4.6)
    ax = fig.add_subplot()
    ax.axvspan(n_min, n_max, color="0.9", zorder=0)
    n_lo, n_hi = n_min, n_max
    for i, c in enumerate(budgets):
        opt = law.compute_optimal(c)
        n_line = np.geomspace(float(opt.N) / 30, float(opt.N) * 30, 240)
        n_lo, n_hi = min(n_lo, n_line[0]), max(n_hi, n_line[-1])
        loss = law.isoflop(c, n_line)
        d_line = c / (6.0 * n_line)
        inside = (n_line >= n_min) & (n_line <= n_max) & (d_line >= d_min) & (d_line <= d_max)
        ax.plot(n_line, loss, color=f"C{i}", ls="--", lw=0.9)
        ax.plot(n_line, np.where(inside, loss, np.nan), color=f"C{i}", lw=2.2,
                label=f"C = {c:.2g} FLOPs")
        ax.plot([float(opt.N)], [float(opt.loss)], "o", color=f"C{i}")
    ax.plot([], [], color=_GREY, lw=2.2, label="N and D within the fitted data")
    ax.plot([], [], color=_GREY, ls="--", lw=0.9, label="extrapolated")
    ax.plot([], [], "o", color=_GREY, label="compute-optimal N")
    ax.fill_between([], [], color="0.9", label=f"fitted N: {n_min:.2g} to {n_max:.2g}")
    a, _ = law.exponents
    log_axis(ax, "x", n_lo, n_hi)
    ax.set(xlabel=n_label(n_key, fit), ylabel=loss_label("predicted loss", unit))
    where = f" at S = {sparsity:g}" if "S" in d else ""
    _title(ax, fit, [f"iso-FLOP curves{where} (N_opt ~ C^{a:.3f}); fitted D: {d_min:.2g} to "
                     f"{d_max:.2g} tokens"])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, Path(path))


def plot_all(fit, out_dir, *, prefix: str = "", n_key=None, sparsity=None, loss_se=None,
             unit: str | None = None, force: bool = False) -> list[Path]:
    """Every plot for ``fit`` into ``out_dir``; returns the paths. ``loss_se`` (one per fitted
    point) draws error bars, ``unit`` labels the loss axes (:func:`point_info` reads both
    from a fit's source). The iso-FLOP plot (a compute-optimal claim) is left out for a
    degenerate fit unless ``force``."""
    out = Path(out_dir)
    kw = {"n_key": n_key, "sparsity": sparsity, "loss_se": loss_se, "unit": unit}
    paths = [
        predicted_vs_observed(fit, out / f"{prefix}predicted_vs_observed.png", **kw),
        loss_vs_n(fit, out / f"{prefix}loss_vs_n.png", **kw),
        residuals(fit, out / f"{prefix}residuals.png", **kw),
    ]
    if getattr(fit, "degenerate", False) and not force:
        return paths
    try:
        paths.append(isoflop(fit, out / f"{prefix}isoflop.png", n_key=n_key, unit=unit))
    except ValueError:  # a law without a compute-optimal split (a zero exponent)
        pass
    return paths
