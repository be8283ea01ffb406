"""Curves of a run, or of a sweep's runs overlaid, in one figure (matplotlib's Agg canvas: no
display, no pyplot state).

A sweep's runs are grouped by its axes (:func:`sparsejax.results.curves.sweep_axes`): the first
axis sets the colour, the second the line style, the third the marker, any further ones join
the colour; the legend has one entry per axis value, so a 27-run sweep needs 9 entries, not 27.
A ``val_loss`` curve carries a band of ± one standard error (``val_loss_se``); a lone run's
loss curve shows the other loss faintly beside it. Loss axes carry the unit of the runs' data
(:func:`scaling.plots.loss_unit`: ``nats/byte`` or ``nats/token``).
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from scaling.plots import loss_label
from sparsejax import errors
from sparsejax.results.curves import AXIS_NAMES, LOSSES, Curve, Curves, read_curves, run_curve
from sparsejax.run.rundir import PathLike, RunDir

Y_LABELS = {"val_loss": "validation loss", "train_loss": "training loss",
            "sparsity": "sparsity (fraction of prunable weights pruned)",
            "n_avg": "N_avg (average parameter count so far)",
            "mfu": "MFU (model FLOPs utilization)"}
X_LABELS = {"step": "step", "tokens": "tokens seen", "flops": "training FLOPs so far"}
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


def _axis_text(key: str, value: Any) -> str:
    return f"{AXIS_NAMES.get(key, key)}={value}"


def _values(curves: list[Curve], key: str) -> list[Any]:
    """The axis's values in order of first appearance, numbers sorted."""
    seen = list(dict.fromkeys(repr(c.axes.get(key)) for c in curves))
    values = {repr(c.axes.get(key)): c.axes.get(key) for c in curves}
    out = [values[r] for r in seen]
    if all(isinstance(v, int | float) for v in out):
        out.sort()
    return out


def _styles(curves: Curves) -> tuple[list[dict[str, Any]], list[Line2D]]:
    """Per curve its plot keywords, and the legend's handles (one per axis value; one per run
    when the runs share every override, e.g. a soup's)."""
    axes = curves.axes
    if not axes:
        styles = [{"color": f"C{i % 10}"} for i in range(len(curves.curves))]
        return styles, [Line2D([], [], lw=3, label=c.name, **kw)
                        for c, kw in zip(curves.curves, styles, strict=True)]
    colour_keys = [axes[0], *axes[3:]] if axes else []
    style_key = axes[1] if len(axes) > 1 else None
    marker_key = axes[2] if len(axes) > 2 else None
    colours = list(itertools.product(*(_values(curves.curves, k) for k in colour_keys)))
    handles: list[Line2D] = []
    for i, combo in enumerate(colours):
        label = ", ".join(_axis_text(k, v) for k, v in zip(colour_keys, combo, strict=True))
        if any(tuple(c.axes.get(k) for k in colour_keys) == combo for c in curves.curves):
            handles.append(Line2D([], [], color=f"C{i % 10}", lw=3, label=label or "run"))
    for key, kind, options in ((style_key, "ls", STYLES), (marker_key, "marker", MARKERS)):
        if key is None:
            continue
        for j, value in enumerate(_values(curves.curves, key)):
            extra = {kind: options[j % len(options)]}
            if kind == "marker":
                extra["ls"] = "none"
            handles.append(Line2D([], [], color="0.35", label=_axis_text(key, value), **extra))
    styles = []
    for c in curves.curves:
        combo = tuple(c.axes.get(k) for k in colour_keys)
        kw: dict[str, Any] = {"color": f"C{colours.index(combo) % 10}" if colour_keys else "C0"}
        if style_key is not None:
            kw["ls"] = STYLES[_values(curves.curves, style_key).index(c.axes.get(style_key))
                              % len(STYLES)]
        if marker_key is not None:
            kw["marker"] = MARKERS[_values(curves.curves, marker_key).index(
                c.axes.get(marker_key)) % len(MARKERS)]
            kw["markevery"] = max(1, len(c.x) // 6)
            kw["ms"] = 4
        styles.append(kw)
    return styles, handles


def _title(fig: Figure, text: str, fontsize: float = 10) -> str:
    chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)) - 4)
    return "\n".join(textwrap.wrap(text, chars))


def figure(curves: Curves) -> Figure:
    """The figure of :func:`~sparsejax.results.curves.read_curves`' result."""
    sweep = curves.kind == "sweep"
    fig = Figure(figsize=(8.0 if sweep else 6.4, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if sweep:
        styles, handles = _styles(curves)
    else:
        styles, handles = [{"color": "C0", "marker": "o", "ms": 3}], []
    for curve, kw in zip(curves.curves, styles, strict=True):
        label = None if sweep else Y_LABELS[curves.metric].split(" (")[0] + (
            " (band: ± 1 standard error)" if curve.se is not None else "")
        ax.plot(curve.x, curve.y, lw=1.4, label=label, **kw)
        if curve.se is not None:
            ax.fill_between(curve.x, curve.y - curve.se, curve.y + curve.se, color=kw["color"],
                            alpha=0.18, lw=0)
    y_label = loss_label(Y_LABELS[curves.metric], curves.unit)
    if not sweep and curves.metric in LOSSES:  # the other loss, faint, for context
        other = LOSSES[1 - LOSSES.index(curves.metric)]
        try:
            c = run_curve(RunDir(curves.path), other, curves.x)
        except errors.InputError:
            c = None
        if c is not None:
            ax.plot(c.x, c.y, color="0.6", lw=1.0, label=Y_LABELS[other])
            y_label = loss_label("loss", curves.unit)
    if curves.x == "flops" and all((c.x > 0).all() for c in curves.curves):
        ax.set_xscale("log")
    elif curves.x != "step":
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    ax.set_xlabel(X_LABELS[curves.x])
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    what = Y_LABELS[curves.metric].split(" (")[0]
    if sweep:
        band = " (band: ± 1 standard error)" if any(c.se is not None for c in curves.curves) else ""
        ax.set_title(_title(fig, f"sweep {curves.path.name}: {what} of {len(curves.curves)} runs"
                            f"{band}"), fontsize=10)
        ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.set_title(_title(fig, f"run {curves.path.name}: {what}"), fontsize=10)
        ax.legend(fontsize=8)
    return fig


def default_out(path: PathLike, metric: str, x: str) -> Path:
    """``./NAME_METRIC_vs_X.png`` in the current folder (NAME: the run or sweep dir's)."""
    return Path(f"{Path(path).absolute().name}_{metric}_vs_{x}.png")


def plot(path: PathLike, metric: str = "val_loss", x: str = "step",
         out: PathLike | None = None) -> tuple[Path, Curves]:
    """Write the figure of ``path``'s ``metric`` curves against ``x`` to ``out`` (default
    :func:`default_out`; the suffix picks the format: png, pdf, svg, ...); returns the file
    and what was read (``Curves.skipped`` lists the sweep's runs left out, and why)."""
    out = default_out(path, metric, x) if out is None else Path(out)
    formats = FigureCanvasAgg.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise errors.InputError(f"--out {out}: the suffix must name an image format "
                                f"({', '.join('.' + f for f in sorted(formats))})")
    if out.is_dir():
        raise errors.InputError(f"--out {out} is a folder; give a file name")
    curves = read_curves(path, metric, x)
    fig = figure(curves)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out, curves
