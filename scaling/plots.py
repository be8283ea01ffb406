"""Diagnostic plots of fitted laws, written to files (matplotlib's Agg canvas, no pyplot state).

Each function takes a ``ChinchillaFit`` or ``FrantarFit`` (their ``data`` holds the fitted
points), writes one PNG and returns its path; ``plot_all`` writes every plot that applies.
Every plot names the parameter count used as N (``n_key``: ``n_avg``, the average count over
training of Jin et al. 2025; ``n_active``, the final non-zero count of Frantar et al. 2023;
``n_params``, the total), marks dense runs (sparsity 0: circles) apart from sparse ones
(another marker per sparsity level, with a legend), and labels log axes at decades (or at
1-2-5 within a decade) with minor ticks unlabelled, so tick labels never overlap. Sparsity comes
from the fit (Frantar's law) or ``sparsity=`` (the sweep's final sparsity per run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

N_LABELS = {
    "n_avg": "N = N_avg (average parameter count over training)",
    "n_active": "N = final non-zero parameters",
    "n_params": "N = total parameters",
    "N": "N (as given)",
}
_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


def n_label(n_key: str | None, fit=None) -> str:
    """Axis label naming which N a fit used."""
    if n_key is None:
        n_key = "n_active" if fit is not None and "S" in fit.data else "N"
    return N_LABELS.get(n_key, f"N = {n_key}")


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _title(fit, text: str) -> str:
    return f"{text}{'  [DEGENERATE FIT]' if getattr(fit, 'degenerate', False) else ''}"


def predicted_vs_observed(fit, path, *, n_key=None, sparsity=None) -> Path:
    obs, pred = fit.data["loss"], _predict_points(fit)
    s = _sparsity(fit, sparsity)
    fig = Figure(figsize=(5.5, 4.8))
    ax = fig.add_subplot()
    sc = None
    for mask, marker, label in _levels(s):
        sc = ax.scatter(pred[mask], obs[mask], c=np.log10(fit.data["D"][mask]), s=18,
                        marker=marker, cmap="viridis", label=label,
                        vmin=np.log10(fit.data["D"].min()), vmax=np.log10(fit.data["D"].max()))
    lo, hi = _pad(min(obs.min(), pred.min()), max(obs.max(), pred.max()), 1.02)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    log_axis(ax, "x", lo, hi)
    log_axis(ax, "y", lo, hi)
    ax.set(xlabel="predicted loss", ylabel="observed loss",
           title=_title(fit, f"{type(fit).__name__}: predicted vs observed\n{n_label(n_key, fit)}"))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.colorbar(sc, ax=ax, label="log10 D (tokens)")
    return _save(fig, Path(path))


def residuals(fit, path, *, n_key=None, sparsity=None) -> Path:
    d = fit.data
    res = np.log(_predict_points(fit) / d["loss"])
    s = _sparsity(fit, sparsity)
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    flops = 6 * d["N"] * d["D"]
    for (mask, marker, label), i in zip(_levels(s), range(99), strict=False):
        ax.scatter(flops[mask], res[mask], s=18, marker=marker, color=f"C{i}", label=label)
    ax.axhline(0.0, color="k", lw=1)
    log_axis(ax, "x", *_pad(flops.min(), flops.max()))
    ax.set(xlabel="6 N D (FLOPs)", ylabel="log(predicted / observed)",
           title=_title(fit, f"residuals (rms {np.sqrt(np.mean(res**2)):.3g}); "
                        f"{n_label(n_key, fit)}"))
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def _d_groups(log_d: np.ndarray, n_groups: int) -> np.ndarray:
    levels = np.unique(log_d)
    if levels.size <= n_groups:
        return np.searchsorted(levels, log_d)
    edges = np.quantile(log_d, np.linspace(0, 1, n_groups + 1))
    return np.clip(np.searchsorted(edges, log_d, side="right") - 1, 0, n_groups - 1)


def loss_vs_n(fit, path, *, n_groups: int = 4, n_key=None, sparsity=None) -> Path:
    """Loss against N: a marker per sparsity level (dense: circles), a colour per group of D,
    and the fitted curve for each (sparsity level, D group) over that level's range of N."""
    d = fit.data
    s = _sparsity(fit, sparsity)
    groups = _d_groups(np.log(d["D"]), n_groups)
    fig = Figure(figsize=(6.5, 4.8))
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
            ax.scatter(d["N"][m], d["loss"][m], s=22, marker=marker, color=col, alpha=0.8)
            ax.plot(n_line, curve, color=col, ls=styles[li % len(styles)], lw=1.2)
    for li, (_, marker, label) in enumerate(_levels(s)):  # legend: marker and line style
        ax.plot([], [], color="0.3", marker=marker, ls=styles[li % len(styles)], label=label)
    for g in np.unique(groups):
        dm = float(np.exp(np.median(np.log(d["D"][groups == g]))))
        ax.plot([], [], color=f"C{int(g) % 10}", lw=4, label=f"D~{dm:.2g}")
    log_axis(ax, "x", *_pad(d["N"].min(), d["N"].max(), 1.4))
    lo, hi = _pad(d["loss"].min(), d["loss"].max(), 1.03)
    log_axis(ax, "y", lo, hi)
    ax.set(xlabel=n_label(n_key, fit), ylabel="loss",
           title=_title(fit, "loss vs N, fitted law per sparsity level and D"))
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, Path(path))


def isoflop(fit, path, *, n_budgets: int = 6, sparsity: float = 0.0, n_key=None) -> Path:
    """Predicted loss along iso-FLOP lines (C = 6 N D) with the compute-optimal N marked."""
    d = fit.data
    law = fit.law.at_sparsity(sparsity) if "S" in d else fit.law
    c_all = 6 * d["N"] * d["D"]
    budgets = np.geomspace(c_all.min(), c_all.max(), n_budgets)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    n_lo, n_hi = np.inf, 0.0
    for i, c in enumerate(budgets):
        opt = law.compute_optimal(c)
        n_line = np.geomspace(float(opt.N) / 30, float(opt.N) * 30, 120)
        n_lo, n_hi = min(n_lo, n_line[0]), max(n_hi, n_line[-1])
        ax.plot(n_line, law.isoflop(c, n_line), color=f"C{i}", label=f"C={c:.2g}")
        ax.plot([float(opt.N)], [float(opt.loss)], "o", color=f"C{i}")
    a, _ = law.exponents
    log_axis(ax, "x", n_lo, n_hi)
    ax.set(xlabel=n_label(n_key, fit), ylabel="predicted loss",
           title=_title(fit, f"iso-FLOP curves (N_opt ~ C^{a:.3f})"))
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_all(fit, out_dir, *, prefix: str = "", n_key=None, sparsity=None,
             force: bool = False) -> list[Path]:
    """Every plot for ``fit`` into ``out_dir``; returns the paths. The iso-FLOP plot (a
    compute-optimal claim) is left out for a degenerate fit unless ``force``."""
    out = Path(out_dir)
    kw = {"n_key": n_key, "sparsity": sparsity}
    paths = [
        predicted_vs_observed(fit, out / f"{prefix}predicted_vs_observed.png", **kw),
        loss_vs_n(fit, out / f"{prefix}loss_vs_n.png", **kw),
        residuals(fit, out / f"{prefix}residuals.png", **kw),
    ]
    if getattr(fit, "degenerate", False) and not force:
        return paths
    try:
        paths.append(isoflop(fit, out / f"{prefix}isoflop.png", n_key=n_key))
    except ValueError:  # a law without a compute-optimal split (a zero exponent)
        pass
    return paths
