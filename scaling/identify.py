"""Bounds for scaling-law fits and the checks that flag a fit ``degenerate`` (issue 14).

A robust fit of ``L = E + A/N^alpha + B/D^beta`` (Hoffmann et al. 2022; fitted as Besiroglu
et al. 2024 do) always returns *some* optimum; on data that cannot pin the law down it returns
nonsense (issue 14's 8-run sweep: two budgets D, E = 5e-283, B = 4e133, beta = 23.2). Fits are
therefore bounded, and a fit is ``degenerate`` (with its reasons) when the data do not support it.

Bounds (internal parameters: log-coefficients and exponents; recorded in the fit as natural
values):
- exponents (alpha, beta; Frantar's b, d, f) in ``EXPONENT_RANGE`` = [0, 2], the span of
  Besiroglu et al.'s start grid;
- every coefficient of a term (E, A, B; Frantar's a, c, e, g) such that the term can neither
  exceed the observed loss at any point (terms are positive and sum to the loss) nor stay below
  ``TERM_FLOOR`` = 0.1% of the loss at every point: a term that small is below what a
  validation loss resolves (issue 14 asks for a standard error of <= 0.2%), so the data cannot
  tell it from zero. For ``E`` that is ``[1e-3 min L, min L]``; for ``A`` (exponent in [0, 2]
  and N >= 1) ``[1e-3 min L, min_i L_i N_i^2]``; in general the box follows from the law's
  design (``coefficient_box``).

Reasons a fit is flagged (``diagnose``; ``bootstrap_reasons`` adds the last):
- a free parameter sits on a bound (within ``ON_BOUND`` = 1e-6 of the box's width): the data
  pushed it to the edge of what they justify;
- a free exponent whose data column has fewer than ``MIN_DISTINCT`` = 3 distinct values while
  the term's offset is free (E for alpha and beta): a coefficient, an exponent and an offset
  are three unknowns and two levels give two equations;
- a near-zero eigenvalue of the Hessian of the mean squared log residual in the zero-residual
  limit, ``H = J^T J / n`` with ``J`` the derivative of the predicted log loss at each point
  with respect to the free internal parameters (for points inside Huber's delta this is the
  fit objective's own curvature; unlike the exact Hessian of the Huber objective it does not
  vanish for points in Huber's linear zone, so it measures the data and the law, not which
  points happen to be outliers). ``lambda_min < CURVATURE_FLOOR`` = 1e-8 means that moving the
  parameters a unit along its eigenvector (a factor e in a coefficient, 1 in an exponent)
  changes the fitted log loss by less than 1e-4 RMS over the data, 20x below the 0.2%
  standard error of a validation loss: that direction is not measured;
- a bootstrap percentile interval that excludes the full-data estimate: the optimum is not a
  stable function of the data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from scaling import forms

EXPONENT_RANGE = (0.0, 2.0)
TERM_FLOOR = 1e-3
MIN_DISTINCT = 3
CURVATURE_FLOOR = 1e-8
ON_BOUND = 1e-6

__all__ = [
    "CURVATURE_FLOOR",
    "EXPONENT_RANGE",
    "MIN_DISTINCT",
    "ON_BOUND",
    "TERM_FLOOR",
    "bootstrap_reasons",
    "coefficient_box",
    "diagnose",
    "internal_bounds",
    "log_jacobian",
    "natural_bounds",
]


def _exponent_box(form: forms.Form, overrides: Mapping[str, tuple[float, float]]):
    lo = np.full(len(form.internal), -np.inf)
    hi = np.full(len(form.internal), np.inf)
    for j, (nat, lg) in enumerate(zip(form.natural, form.is_log, strict=True)):
        if not lg:
            lo[j], hi[j] = overrides.get(nat, EXPONENT_RANGE)
    return lo, hi


def coefficient_box(
    design: np.ndarray, loss: np.ndarray, lo: np.ndarray, hi: np.ndarray, is_log: tuple
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of each log-coefficient from the exponents' box ``lo, hi`` and the data.

    Term k is ``exp(c + sum_j M_kij theta_j)`` at point i, ``c`` its log-coefficient. It must
    not exceed ``L_i`` at any point and must reach ``TERM_FLOOR L_i`` at some point, for some
    exponents in their box: ``c <= min_i (log L_i - sum_j min(M lo_j, M hi_j))`` and
    ``c >= min_i (log(TERM_FLOOR L_i) - sum_j max(M lo_j, M hi_j))``.
    """
    lo, hi = lo.copy(), hi.copy()
    log_l = np.log(loss)
    for k in range(design.shape[0]):
        m = design[k]  # (n, P)
        used = np.any(m != 0, axis=0)
        coef = [j for j in np.flatnonzero(used) if is_log[j]]
        if len(coef) != 1 or not np.all(m[:, coef[0]] == 1.0):
            raise ValueError(f"term {k} needs exactly one log-coefficient column of ones")
        c = coef[0]
        rest = [j for j in np.flatnonzero(used) if j != c]
        a, b = m[:, rest] * lo[rest], m[:, rest] * hi[rest]
        low_part = np.minimum(a, b).sum(axis=1)
        high_part = np.maximum(a, b).sum(axis=1)
        hi[c] = float(np.min(log_l - low_part))
        lo[c] = float(np.min(np.log(TERM_FLOOR) + log_l - high_part))
    return lo, hi


def internal_bounds(
    form: forms.Form,
    data: Mapping[str, np.ndarray],
    loss: np.ndarray,
    fixed_internal: Mapping[int, float],
    overrides: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Box (lo, hi) over all internal parameters; fixed ones take their value in the box of
    the others. ``overrides`` maps natural names to (lo, hi) natural bounds that replace the
    defaults (coefficients > 0)."""
    overrides = dict(overrides or {})
    for name, pair in overrides.items():
        if name not in form.natural:
            valid = ", ".join(form.natural)
            raise ValueError(f"bounds: unknown parameter {name!r}; valid: {valid}")
        lg = form.is_log[form.natural.index(name)]
        try:
            a, b = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(f"bounds[{name!r}] must be a (low, high) pair; got {pair!r}") from None
        if not (np.isfinite(a) and np.isfinite(b) and a < b and (a > 0 or not lg)):
            raise ValueError(
                f"bounds[{name!r}] must be finite with low < high{' and low > 0' if lg else ''}; "
                f"got ({a}, {b})"
            )
    lo, hi = _exponent_box(form, overrides)
    _check_fixed(form, fixed_internal, lo, hi, exponents=True)
    for j, value in fixed_internal.items():
        lo[j] = hi[j] = value
    lo, hi = coefficient_box(form.design(data), loss, lo, hi, form.is_log)
    for name, (a, b) in overrides.items():
        j = form.natural.index(name)
        if form.is_log[j]:
            lo[j], hi[j] = np.log(a), np.log(b)
    _check_fixed(form, fixed_internal, lo, hi, exponents=False)
    for j, value in fixed_internal.items():
        lo[j] = hi[j] = value
    return lo, hi


def _check_fixed(form, fixed_internal, lo, hi, *, exponents: bool) -> None:
    for j, value in fixed_internal.items():
        if form.is_log[j] == exponents:
            continue
        if not lo[j] - 1e-12 <= value <= hi[j] + 1e-12:
            name, box = form.natural[j], natural_bounds(form, lo, hi)[form.natural[j]]
            shown = np.exp(value) if form.is_log[j] else value
            why = "the range exponents are fitted in" if exponents else "what the data justify"
            raise ValueError(
                f"fixed[{name!r}] = {shown:g} is outside [{box[0]:.6g}, {box[1]:.6g}], {why} "
                "(widen it with bounds=)"
            )


def natural_bounds(form: forms.Form, lo: np.ndarray, hi: np.ndarray) -> dict:
    """``{natural name: (low, high)}`` of an internal box."""
    out = {}
    for j, (nat, lg) in enumerate(zip(form.natural, form.is_log, strict=True)):
        out[nat] = (float(np.exp(lo[j])), float(np.exp(hi[j]))) if lg else (lo[j], hi[j])
        out[nat] = tuple(float(v) for v in out[nat])
    return out


def log_jacobian(design: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``d log pred_i / d theta`` (n, P) of ``log pred_i = LSE_k(M_ki . theta)``."""
    u = np.einsum("knp,p->kn", design, theta)
    w = np.exp(u - u.max(axis=0))
    w /= w.sum(axis=0)
    return np.einsum("kn,knp->np", w, design)


def _direction(names, vec) -> str:
    order = np.argsort(-np.abs(vec))[:3]
    return ", ".join(f"{vec[i]:+.2f} {names[i]}" for i in order if abs(vec[i]) > 0.05)


def diagnose(
    form: forms.Form,
    data: Mapping[str, np.ndarray],
    theta: np.ndarray,
    free: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
) -> tuple[str, ...]:
    """The reasons (none: a sound fit) why the fit at ``theta`` (all internal parameters) is
    degenerate: a free parameter on a bound, a free exponent with < 3 distinct values in its
    column, a near-zero eigenvalue of ``J^T J / n`` over the free parameters."""
    reasons = []
    nat = forms.to_natural(form, theta)
    box = natural_bounds(form, lo, hi)
    for j in np.flatnonzero(free):
        name = form.natural[j]
        tol = ON_BOUND * max(hi[j] - lo[j], 1e-12)
        for side, edge in (("lower", lo[j]), ("upper", hi[j])):
            if abs(theta[j] - edge) <= tol:
                reasons.append(
                    f"{name} = {nat[name]:.4g} sits on its {side} bound "
                    f"(bounds [{box[name][0]:.4g}, {box[name][1]:.4g}])"
                )
    free_names = {form.natural[j] for j in np.flatnonzero(free)}
    for expo, (col, offset) in form.exponents.items():
        if expo not in free_names or offset not in free_names:
            continue
        values = np.unique(data[col])
        if values.size < MIN_DISTINCT:
            shown = ", ".join(f"{v:.4g}" for v in values)
            reasons.append(
                f"{expo} is not identified: {col} has {values.size} distinct value(s) ({shown}); "
                f"a free exponent with its coefficient and {offset} needs >= {MIN_DISTINCT} "
                f"(add runs or fix {expo} or {offset})"
            )
    if free.any():
        jac = log_jacobian(form.design(data), theta)[:, free]
        curv = jac.T @ jac / jac.shape[0]
        vals, vecs = np.linalg.eigh(curv)
        if not np.all(np.isfinite(vals)) or vals[0] < CURVATURE_FLOOR:
            names = [form.natural[j] for j in np.flatnonzero(free)]
            direction = _direction([("log " + n) if form.is_log[form.natural.index(n)] else n
                                    for n in names], vecs[:, 0])
            reasons.append(
                f"the data do not identify the parameters: the Hessian of the mean squared log "
                f"residual has eigenvalue {vals[0]:.2g} < {CURVATURE_FLOOR:g} along ({direction})"
            )
    return tuple(reasons)


def sound(design, theta, free, lo, hi) -> bool:
    """No free parameter on a bound and no flat direction: ``diagnose``'s bound and curvature
    checks, without the messages (used to pick refit starts)."""
    f = np.flatnonzero(free)
    tol = ON_BOUND * np.maximum(hi[f] - lo[f], 1e-12)
    if np.any((theta[f] - lo[f] <= tol) | (hi[f] - theta[f] <= tol)):
        return False
    jac = log_jacobian(design, theta)[:, free]
    vals = np.linalg.eigvalsh(jac.T @ jac / jac.shape[0])
    return bool(np.all(np.isfinite(vals)) and vals[0] >= CURVATURE_FLOOR)


def bootstrap_reasons(boot, fixed=(), level: float = 0.95) -> tuple[str, ...]:
    """A reason per free coefficient whose bootstrap ``level`` interval excludes its estimate."""
    reasons = []
    for name, (a, b) in boot.ci(level).items():
        est = boot.estimate[name]
        if name in fixed:
            continue
        if not a <= est <= b:
            reasons.append(
                f"the bootstrap {100 * level:g}% interval of {name} [{a:.4g}, {b:.4g}] "
                f"excludes its estimate {est:.4g}"
            )
    return tuple(reasons)
