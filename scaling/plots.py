"""Diagnostic plots of fitted laws, written to files (matplotlib's Agg canvas, no pyplot state).

Each function takes a ``ChinchillaFit`` or ``FrantarFit`` (their ``data`` holds the fitted
points), writes one PNG and returns its path; ``plot_all`` writes every plot that applies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _predict_points(fit) -> np.ndarray:
    d = fit.data
    return fit.predict(d["S"], d["N"], d["D"]) if "S" in d else fit.predict(d["N"], d["D"])


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _color_values(fit):
    d = fit.data
    return (d["S"], "sparsity") if "S" in d else (np.log10(d["D"]), "log10 D")


def predicted_vs_observed(fit, path) -> Path:
    obs, pred = fit.data["loss"], _predict_points(fit)
    c, label = _color_values(fit)
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    sc = ax.scatter(pred, obs, c=c, s=12, cmap="viridis")
    lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="predicted loss",
        ylabel="observed loss",
        title=f"{type(fit).__name__}: predicted vs observed",
    )
    fig.colorbar(sc, ax=ax, label=label)
    return _save(fig, Path(path))


def residuals(fit, path) -> Path:
    d = fit.data
    res = np.log(_predict_points(fit) / d["loss"])
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    c, label = _color_values(fit)
    sc = ax.scatter(6 * d["N"] * d["D"], res, c=c, s=12, cmap="viridis")
    ax.axhline(0.0, color="k", lw=1)
    ax.set(
        xscale="log",
        xlabel="6 N D (FLOPs)",
        ylabel="log(predicted / observed)",
        title=f"residuals (rms {np.sqrt(np.mean(res**2)):.3g})",
    )
    fig.colorbar(sc, ax=ax, label=label)
    return _save(fig, Path(path))


def loss_vs_n(fit, path, *, n_groups: int = 5) -> Path:
    """Loss against N with the fitted curve per group of D (per sparsity for the sparse law)."""
    d = fit.data
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    n_line = np.geomspace(d["N"].min() / 1.5, d["N"].max() * 1.5, 100)
    if "S" in d:
        groups = [(d["S"] == s, f"S={s:g}", s) for s in np.unique(d["S"])]
        d_mid = float(np.exp(np.median(np.log(d["D"]))))
    else:
        edges = np.quantile(np.log(d["D"]), np.linspace(0, 1, n_groups + 1))
        which = np.clip(np.searchsorted(edges, np.log(d["D"]), side="right") - 1, 0, n_groups - 1)
        groups = [(which == g, None, None) for g in range(n_groups) if np.any(which == g)]
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for (mask, label, s), col in zip(groups, colors, strict=True):
        if "S" in d:
            curve = fit.predict(np.full_like(n_line, s), n_line, np.full_like(n_line, d_mid))
        else:
            dm = float(np.exp(np.median(np.log(d["D"][mask]))))
            label = f"D~{dm:.2g}"
            curve = fit.predict(n_line, np.full_like(n_line, dm))
        ax.scatter(d["N"][mask], d["loss"][mask], s=10, color=col, alpha=0.7)
        ax.plot(n_line, curve, color=col, label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"N ({'non-zero' if 'S' in d else 'parameters'})",
        ylabel="loss",
        title="loss vs N, fitted law",
    )
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def isoflop(fit, path, *, n_budgets: int = 6, sparsity: float = 0.0) -> Path:
    """Predicted loss along iso-FLOP lines (C = 6 N D) with the compute-optimal N marked."""
    d = fit.data
    law = fit.law.at_sparsity(sparsity) if "S" in d else fit.law
    c_all = 6 * d["N"] * d["D"]
    budgets = np.geomspace(c_all.min(), c_all.max(), n_budgets)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for i, c in enumerate(budgets):
        opt = law.compute_optimal(c)
        n_line = np.geomspace(float(opt.N) / 30, float(opt.N) * 30, 120)
        ax.plot(n_line, law.isoflop(c, n_line), color=f"C{i}", label=f"C={c:.2g}")
        ax.plot([float(opt.N)], [float(opt.loss)], "o", color=f"C{i}")
    a, _ = law.exponents
    ax.set(
        xscale="log",
        xlabel="N",
        ylabel="predicted loss",
        title=f"iso-FLOP curves (N_opt ~ C^{a:.3f})",
    )
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_all(fit, out_dir, *, prefix: str = "") -> list[Path]:
    """Every plot for ``fit`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    paths = [
        predicted_vs_observed(fit, out / f"{prefix}predicted_vs_observed.png"),
        loss_vs_n(fit, out / f"{prefix}loss_vs_n.png"),
        residuals(fit, out / f"{prefix}residuals.png"),
    ]
    try:
        paths.append(isoflop(fit, out / f"{prefix}isoflop.png"))
    except ValueError:  # a law without a compute-optimal split (a zero exponent)
        pass
    return paths
