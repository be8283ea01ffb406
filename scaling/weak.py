"""Weak identification: parameters whose bootstrap intervals are too wide to trust (issue 25).

``scaling.identify`` flags a fit *degenerate* when the data cannot determine it at all (an
optimum on a bound, a flat direction, too few distinct N or D). A fit can pass those checks and
still be barely measured: on designs whose losses sit far above E, E's bootstrap interval
spanned [0.007, 3.2] around a median error of 28%. This module reports, for every free
parameter, the relative width of its bootstrap percentile interval and flags the fit ``weak``
where one exceeds ``WEAK_WIDTH``.

What is measured (``relative_widths``):
- an exponent (alpha, beta; Frantar's b, d, f) or an additive constant (E; Frantar's g): the
  interval of the parameter itself, ``(high - low) / |estimate|``;
- the coefficient of a power term (A, B; Frantar's a, c, e): the interval of the term at the
  centre of the data, the geometric mean over the points of e.g. ``A / N^alpha``. A and alpha
  trade off along the data (``d log A = log N d alpha``: with N ~ 1e9 an exponent known to
  +-0.02 moves A by a factor 1.5), so A's own interval is wide even when the law is well
  measured (Besiroglu et al. 2024 report B = 2085 +- 1293 on the Chinchilla data); the term's
  size where the data are is what the data determine.

``WEAK_WIDTH`` = 1: the 95% interval is wider than the estimate itself (e.g. more than
+-50%): the data do not fix the parameter's magnitude, and extrapolations that lean on it
(E sets the loss at infinite scale; an exponent sets the compute-optimal split) are not
supported. On the Chinchilla data (240 runs) every width is about 0.3 or less; on Frantar et al.'s
T5 runs (48) the D term, its exponent f and g exceed it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from scaling import forms

WEAK_WIDTH = 1.0

__all__ = ["WEAK_WIDTH", "Width", "relative_widths", "weak_reasons"]


class Width(NamedTuple):
    quantity: str  # what the interval is of ("E", "A N^-alpha at the data's centre")
    estimate: float
    low: float
    high: float
    relative: float  # (high - low) / |estimate| (inf for a zero estimate)


def _term_label(form: forms.Form, j: int, design: np.ndarray) -> str | None:
    """``"A/N^alpha"``-style label of the term whose coefficient is internal column ``j``,
    or None for a constant term."""
    term = int(np.flatnonzero(np.any(design[:, :, j] != 0, axis=1))[0])
    others = [q for q in np.flatnonzero(np.any(design[term] != 0, axis=0)) if q != j]
    if not others:
        return None
    parts = []
    for q in others:
        col = form.exponents.get(form.natural[q], (None,))[0]
        expo = form.natural[q]
        parts.append(f"(1-S)^{expo}" if col == "S" else f"{col}^-{expo}" if col else expo)
    return f"{form.natural[j]} " + " ".join(parts)


def _term_centres(form: forms.Form, design: np.ndarray, thetas: np.ndarray) -> np.ndarray:
    """(R, K): the geometric mean over the points of each term, ``exp(mean_i u_ik)``."""
    mean_design = design.mean(axis=1)  # (K, P): u is linear in theta
    return np.exp(thetas @ mean_design.T)


def relative_widths(fit, boot, level: float = 0.95) -> dict[str, Width]:
    """The ``level`` percentile interval and relative width of every free parameter of
    ``fit`` from its bootstrap ``boot`` (module docstring: what each is of)."""
    form = fit._form
    design = form.design({k: fit.data[k] for k in form.columns})
    cols = [boot.names.index(n) for n in form.natural]  # boot order -> form order
    nat = boot.samples[:, cols]  # (R, P) natural coefficients in form.natural order
    est = np.array([boot.estimate[n] for n in form.natural])
    to_int = np.array(form.is_log)

    def internal(x):
        x = np.atleast_2d(x)
        with np.errstate(divide="ignore"):
            return np.where(to_int, np.log(np.maximum(x, 1e-300)), x)

    centres = _term_centres(form, design, internal(nat))
    centre_est = _term_centres(form, design, internal(est))[0]
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    out = {}
    for name in boot.names:
        j = form.natural.index(name)
        if name in fit.fixed:
            continue
        label = _term_label(form, j, design) if form.is_log[j] else None
        if label is None:
            samples, value, quantity = nat[:, j], est[j], name
        else:
            term = int(np.flatnonzero(np.any(design[:, :, j] != 0, axis=1))[0])
            samples, value = centres[:, term], centre_est[term]
            quantity = f"{label} at the data's centre"
        low, high = (float(v) for v in np.percentile(samples, q))
        rel = (high - low) / abs(value) if value != 0 else float("inf")
        out[name] = Width(quantity, float(value), low, high, float(rel))
    return out


def weak_reasons(widths: dict[str, Width], level: float = 0.95) -> tuple[str, ...]:
    """A reason per parameter whose relative width exceeds ``WEAK_WIDTH``."""
    return tuple(
        f"{name} is weakly identified: the {100 * level:g}% interval of {w.quantity} "
        f"[{w.low:.4g}, {w.high:.4g}] is {w.relative:.3g}x its estimate {w.estimate:.4g} "
        f"(> {WEAK_WIDTH:g}; add runs that constrain it or fix it)"
        for name, w in widths.items() if not w.relative <= WEAK_WIDTH
    )


def format_widths(widths: dict[str, Width]) -> str:
    """The widths as a text table."""
    rows = [f"{'parameter':<9} {'relative width':>14}  of"]
    for name, w in widths.items():
        flag = "  WEAK" if not w.relative <= WEAK_WIDTH else ""
        rows.append(f"{name:<9} {w.relative:>14.3g}  {w.quantity}{flag}")
    return "\n".join(rows)
