"""Grid-started robust fits of scaling laws.

``fit_chinchilla`` follows Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt"):
the **sum** of Huber(delta=1e-3) on ``log L - LSE(a - alpha log N, b - beta log D, e)``
minimised from every point of a 4,500-point grid, best kept; the minimiser is the batched
damped Newton of ``scaling.solver`` (all starts at once). ``fit_frantar`` fits the sparse law of
Frantar et al. 2023 the same way. Bootstrap intervals and leave-one-out errors
(``bootstrap``, ``leave_one_out``) live in ``scaling.uncertainty`` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from scaling import forms, identify, likelihood, weak
from scaling.laws import ChinchillaLaw, FrantarLaw
from scaling.solver import Penalty, minimize_bounded
from scaling.uncertainty import Bootstrap, LeaveOneOut, bootstrap, leave_one_out

__all__ = [
    "Bootstrap",
    "ChinchillaFit",
    "FrantarFit",
    "LeaveOneOut",
    "bootstrap",
    "BadPoint",
    "OBJECTIVES",
    "check_point_weights",
    "check_points",
    "fit_chinchilla",
    "fit_form",
    "fit_frantar",
    "kept_rows",
    "leave_one_out",
]


OBJECTIVES = ("huber", "huber_likelihood")


class BadPoint(ValueError):
    """A data point a law cannot be fitted to; ``row`` is its index in the table."""

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row


def check_points(columns: Mapping[str, np.ndarray], loss: np.ndarray, n_free: int) -> None:
    """Raise ValueError for data a law cannot be fitted to (shared by ``scaling.logs``); a bad
    value raises :class:`BadPoint`, which names its row."""
    loss = np.asarray(loss, np.float64)
    if loss.ndim != 1:
        raise ValueError(f"loss must be 1-D; got shape {loss.shape}")
    bad = ~np.isfinite(loss) | (loss <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise BadPoint(
            f"loss must be finite and > 0; {bad.sum()} bad value(s), first at row {row}: "
            f"{loss[bad][0]}", row
        )
    for name, col in columns.items():
        col = np.asarray(col, np.float64)
        if col.shape != loss.shape:
            raise ValueError(f"{name} must have the shape of loss {loss.shape}; got {col.shape}")
        if name == "S":
            ok, valid = np.isfinite(col) & (col >= 0) & (col < 1), "in [0, 1)"
        else:
            ok, valid = np.isfinite(col) & (col > 0), "finite and > 0"
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise BadPoint(f"{name} must be {valid}; bad value {col[i]} at row {i}", i)
        if name in ("N", "D") and np.unique(col).size < 2:
            raise ValueError(f"{name} has a single distinct value ({col[0]}); the law needs >= 2")
    if loss.shape[0] < n_free:
        raise ValueError(f"{loss.shape[0]} points but {n_free} free parameters; need >= {n_free}")


@dataclass(frozen=True, repr=False)
class _FitTable:
    """Shared fields and behaviour of fit results: table repr, coefficient dict.

    ``bounds`` holds each coefficient's (low, high) box the fit was confined to and
    ``reasons`` why the fit is ``degenerate`` (empty when it is not; ``scaling.identify``).
    Subclasses add the law's coefficients (construct with keywords)."""

    _form: ClassVar[forms.Form]
    _order: ClassVar[tuple[str, ...]]

    objective: float
    n_points: int
    n_starts: int
    n_converged: int
    n_at_best: int
    huber_delta: float
    asymmetry: float
    space: str
    fixed: tuple[str, ...]
    theta: np.ndarray = field(compare=False)  # full parameter vector of the best start
    optima: np.ndarray = field(compare=False)  # distinct local optima, best first (internal)
    data: dict = field(compare=False)  # the points fitted (N, D[, S]) and loss
    bounds: dict = field(compare=False)  # natural name -> (low, high) the fit was confined to
    box: np.ndarray = field(compare=False)  # (2, P): the same box over internal parameters
    reasons: tuple[str, ...]  # why the fit is degenerate (empty: it is not)
    # "huber": the sum of Huber(huber_delta) (objective is that sum); "huber_likelihood": the
    # Huber likelihood of free scale sigma (objective is the negative log-likelihood)
    objective_kind: str = field(default="huber", kw_only=True)
    sigma: float = field(default=float("nan"), kw_only=True)  # the likelihood's scale
    weights: np.ndarray | None = field(default=None, compare=False, kw_only=True)  # per point
    # weak identification (``scaling.weak``, set by ``with_bootstrap``): why, and each free
    # parameter's relative interval width
    weak_reasons: tuple[str, ...] = field(default=(), kw_only=True)
    widths: dict | None = field(default=None, compare=False, kw_only=True)

    @property
    def penalty_delta(self) -> float:
        """The Huber delta the parameters minimise a sum with: ``huber_delta``, or for the
        likelihood ``huber_delta * sigma`` (``scaling.likelihood``)."""
        if self.objective_kind == "huber_likelihood":
            return self.huber_delta * self.sigma
        return self.huber_delta

    @property
    def weak(self) -> bool:
        """True when a bootstrap interval is too wide for the parameter to be trusted
        (``weak_reasons`` says which; ``scaling.weak``). False until ``with_bootstrap``."""
        return bool(self.weak_reasons)

    @property
    def degenerate(self) -> bool:
        """True when the data do not support the fit (``reasons`` says why)."""
        return bool(self.reasons)

    def coefficients(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self._order}

    def with_bootstrap(self, boot: Bootstrap, level: float = 0.95):
        """This fit, also flagged degenerate where a bootstrap ``level`` interval of a free
        coefficient excludes its estimate, and ``weak`` where an interval is wider than
        ``scaling.weak.WEAK_WIDTH`` times its estimate (``widths`` holds every one)."""
        extra = identify.bootstrap_reasons(boot, self.fixed, level)
        new = tuple(r for r in extra if r not in self.reasons)
        widths = weak.relative_widths(self, boot, level)
        return replace(self, reasons=self.reasons + new, widths=widths,
                       weak_reasons=weak.weak_reasons(widths, level))

    def warning(self) -> str:
        """One line naming every reason the fit is degenerate ('' when it is not)."""
        if not self.reasons:
            return ""
        return "degenerate fit: " + "; ".join(self.reasons)

    def __repr__(self) -> str:
        fixed = set(self.fixed)
        how = (f"Huber likelihood, delta={self.huber_delta:g}, sigma={self.sigma:.4g}"
               if self.objective_kind == "huber_likelihood" else
               f"Huber delta={self.huber_delta:g}")
        rows = [
            f"{type(self).__name__} ({self._form.name}, {self.space} residuals, "
            f"{how}, asymmetry={self.asymmetry:g}"
            f"{', weighted' if self.weights is not None else ''})"
        ]
        box = {k: f"bounds [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in self.bounds.items()}
        rows += [
            f"  {k:<9} {v:>14.6g}  {'(fixed)' if k in fixed else box[k]}"
            for k, v in self.coefficients().items()
        ]
        rows += [
            f"  {'objective':<9} {self.objective:>14.6e}  ("
            f"{'negative log-likelihood' if self.objective_kind != 'huber' else 'sum'} over "
            f"{self.n_points} points)",
            f"  starts: {self.n_starts}, converged {self.n_converged}, "
            f"at the best objective {self.n_at_best}",
        ]
        rows += [f"  DEGENERATE: {r}" for r in self.reasons]
        rows += [f"  WEAK: {r}" for r in self.weak_reasons]
        return "\n".join(rows)

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class ChinchillaFit(_FitTable):
    """``L = E + A/N^alpha + B/D^beta`` fitted; ``predict(N, D)`` gives the loss."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    _form = forms.CHINCHILLA
    _order = ("E", "A", "B", "alpha", "beta")

    @property
    def law(self) -> ChinchillaLaw:
        return ChinchillaLaw(
            E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta, reasons=self.reasons
        )

    def predict(self, N, D) -> np.ndarray:
        return self.law.predict(N, D)


@dataclass(frozen=True, repr=False)
class FrantarFit(_FitTable):
    """``L = (a (1-S)^b + c) N^-d + e D^-f + g`` fitted; ``predict(S, N, D)`` gives the loss."""

    a: float
    b: float
    c: float
    d: float
    e: float
    f: float
    g: float
    _form = forms.FRANTAR
    _order = ("a", "b", "c", "d", "e", "f", "g")

    @property
    def law(self) -> FrantarLaw:
        return FrantarLaw(**self.coefficients(), reasons=self.reasons)

    def predict(self, S, N, D) -> np.ndarray:
        return self.law.predict(S, N, D)


def _distinct_optima(
    theta: np.ndarray, obj: np.ndarray, keep, k: int = 12
) -> np.ndarray:
    """The ``k`` best distinct optima (refit starts): the best, then runners-up for which
    ``keep(theta)`` holds, if it holds for the best. Runners-up of a sound best optimum that sit
    on a bound or have a flat direction (the B term shrunk to nothing, say) are left out: a
    refit crawls along them (with them the bootstrap of the Chinchilla fit took 3x the time).
    Around a degenerate best optimum every runner-up is kept: there the replicates do wander
    (and the wide intervals show it)."""
    order = np.argsort(np.where(np.isfinite(obj), obj, np.inf))
    kept: list[np.ndarray] = []
    seen: list[np.ndarray] = []
    picky = True
    for i in order:
        if not np.isfinite(obj[i]) or len(kept) == k or len(seen) >= 20 * k:
            break
        if any(np.max(np.abs(theta[i] - t)) <= 1e-3 for t in seen):
            continue
        seen.append(theta[i])
        if not kept:
            kept.append(theta[i])
            picky = keep(theta[i])
        elif not picky or keep(theta[i]):
            kept.append(theta[i])
    return np.array(kept)


def kept_rows(loss: np.ndarray, drop_highest: int) -> np.ndarray:
    """Indices of the points a fit keeps after dropping the ``drop_highest`` highest losses."""
    loss = np.asarray(loss, np.float64).ravel()
    return np.sort(np.argsort(loss, kind="stable")[: loss.shape[0] - drop_highest])


def fit_form(
    form: forms.Form,
    data: Mapping[str, np.ndarray],
    loss: np.ndarray,
    *,
    huber_delta: float,
    grid,
    fixed: Mapping[str, float] | None,
    asymmetry: float = 0.5,
    space: str = "log",
    drop_highest: int = 0,
    max_iter: int = 400,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    objective: str = "huber",
    weights=None,
):
    """Fit ``form`` from every grid start inside the box of ``scaling.identify`` (``bounds``
    replaces a parameter's default (low, high)); returns the ``ChinchillaFit`` / ``FrantarFit``,
    flagged degenerate with its reasons where the data do not support it.

    ``objective``: ``"huber"`` (the sum of Huber losses) or ``"huber_likelihood"`` (the Huber
    likelihood with a free scale; ``scaling.likelihood``). ``weights`` (n,): per-point
    weights (e.g. ``1 / SE^2``; ``scaling.weights``) multiplying each point's term."""
    if not huber_delta > 0:
        raise ValueError(f"huber_delta must be > 0; got {huber_delta}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}; got {objective!r}")
    if objective == "huber_likelihood" and asymmetry != 0.5:
        raise ValueError("asymmetry must be 0.5 with objective='huber_likelihood' (the Huber "
                         f"density is symmetric); got {asymmetry}")
    if not 0 < asymmetry < 1:
        raise ValueError(f"asymmetry must be in (0, 1) (0.5 = symmetric); got {asymmetry}")
    if space not in ("log", "linear"):
        raise ValueError(f"space must be 'log' or 'linear'; got {space!r}")
    fixed = dict(fixed or {})
    for name, value in fixed.items():
        forms.to_internal(form, name, value)
    loss = np.asarray(loss, np.float64).ravel()
    data = {k: np.asarray(data[k], np.float64).ravel() for k in form.columns}
    n_free = len(form.internal) - len(fixed)
    check_points(data, loss, n_free)
    if not 0 <= drop_highest <= loss.shape[0] - n_free:
        raise ValueError(
            f"drop_highest must be in [0, {loss.shape[0] - n_free}]; got {drop_highest}"
        )
    if weights is not None:
        weights = check_point_weights(weights, loss.shape[0])
    if drop_highest:
        keep = kept_rows(loss, drop_highest)
        loss, data = loss[keep], {k: v[keep] for k, v in data.items()}
        weights = None if weights is None else weights[keep]
        check_points(data, loss, n_free)
    target = np.log(loss) if space == "log" else loss
    model, free, values = forms.build_model(form, data, target, fixed)
    lo, hi = identify.internal_bounds(
        form, data, loss, {j: values[j] for j in np.flatnonzero(~free)}, bounds
    )
    starts = forms.grid_starts(form, grid, free)

    def solve(theta0, delta):
        return minimize_bounded(
            model,
            theta0,
            penalty=Penalty(delta, asymmetry, space),
            weights=weights,
            max_iter=max_iter,
            lower=lo[free],
            upper=hi[free],
            later=np.asarray(form.is_log)[free],
        )

    res = solve(starts, huber_delta)
    full = np.tile(values, (starts.shape[0], 1))
    full[:, free] = res.theta
    i = int(np.nanargmin(np.where(np.isfinite(res.objective), res.objective, np.nan)))
    best = float(res.objective[i])
    design = form.design(data)
    sigma, n_converged = float("nan"), int(res.converged.sum())
    if objective == "huber_likelihood":
        full, res, i, best, sigma = _likelihood_fit(
            solve, design, full, res, i, free, target, huber_delta, weights, lo, hi, space)
    cls = ChinchillaFit if form is forms.CHINCHILLA else FrantarFit
    return cls(
        **{k: v for k, v in forms.to_natural(form, full[i]).items()},
        objective=best,
        n_points=int(loss.shape[0]),
        n_starts=int(starts.shape[0]),
        n_converged=n_converged,
        n_at_best=int(np.sum(res.objective <= res.objective[i] * (1 + 1e-6) + 1e-300)),
        huber_delta=float(huber_delta),
        asymmetry=float(asymmetry),
        space=space,
        fixed=tuple(fixed),
        theta=full[i],
        optima=_distinct_optima(
            full, res.objective, lambda t: identify.sound(design, t, free, lo, hi)
        ),
        data={**data, "loss": loss},
        bounds=identify.natural_bounds(form, lo, hi),
        box=np.stack([lo, hi]),
        reasons=identify.diagnose(form, data, full[i], free, lo, hi),
        objective_kind=objective,
        sigma=sigma,
        weights=weights,
    )


def _residuals(design, theta, target, space):
    u = np.einsum("knp,p->kn", design, theta)
    m = u.max(axis=0)
    log_pred = m + np.log(np.exp(u - m).sum(axis=0))
    return target - (log_pred if space == "log" else np.exp(log_pred))


def _likelihood_fit(solve, design, full, res, i, free, target, delta, weights, lo, hi, space,
                    max_rounds: int = 100, tol: float = 1e-9):
    """Block coordinate descent on the Huber negative log-likelihood (``scaling.likelihood``)
    from the summed-Huber grid fit: sigma from the best parameters' residuals, then the
    parameters by the summed Huber with delta * sigma from the distinct optima so far, until
    sigma moves by less than ``tol`` (relative). Returns the updated full thetas of the last
    solve, its result, the best row, the negative log-likelihood and sigma."""
    sigma = float("nan")
    for _ in range(max_rounds):
        new_sigma = likelihood.best_sigma(_residuals(design, full[i], target, space), delta,
                                          weights)
        if abs(new_sigma / sigma - 1) <= tol:
            break
        sigma = new_sigma
        starts = _distinct_optima(full, res.objective, lambda t: identify.sound(
            design, t, free, lo, hi))[:, free]
        res = solve(starts, delta * sigma)
        full = np.tile(full[i], (starts.shape[0], 1))
        full[:, free] = res.theta
        i = int(np.nanargmin(np.where(np.isfinite(res.objective), res.objective, np.nan)))
    sigma = likelihood.best_sigma(_residuals(design, full[i], target, space), delta, weights)
    r = _residuals(design, full[i], target, space)
    nll = likelihood.negative_log_likelihood(r, sigma, delta, weights)
    return full, res, i, nll, sigma


def check_point_weights(weights, n: int) -> np.ndarray:
    """Per-point weights as a float64 (n,) array, finite, >= 0 and not all zero."""
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have one value per point ({n},); got shape {w.shape}")
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise ValueError("weights must be finite and >= 0, with at least one > 0")
    return w


def fit_chinchilla(
    N,
    D,
    loss,
    *,
    huber_delta: float = 1e-3,
    grid="epoch",
    drop_highest: int = 0,
    fixed: Mapping[str, float] | None = None,
    asymmetry: float = 0.5,
    max_iter: int = 400,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    objective: str = "huber",
    weights=None,
) -> ChinchillaFit:
    """Fit ``L = E + A/N^alpha + B/D^beta`` (Hoffmann et al. 2022) as Besiroglu et al. 2024 do.

    Minimises the sum of Huber(``huber_delta``) on log residuals from every start of ``grid``
    ("epoch": the 4,500 points of docs/design.md, "Scaling"; "coarse": 243; a dict of
    per-parameter values over ``a, b, e, alpha, beta``; or an (S, P) array of starts over the
    free ones).
    ``drop_highest`` drops that many highest-loss points first. ``fixed`` pins coefficients by
    their natural names (``{"alpha": 0.34, "E": 1.69}``). ``asymmetry`` in (0, 1) weighs points
    above the fit by ``2 asymmetry`` and below it by ``2 (1 - asymmetry)`` (0.5: plain Huber).
    With N = N_avg for sparse runs this is the law of Jin et al. 2025.

    The fit is confined to a box (``fit.bounds``: exponents in [0, 2], each term between 0.1%
    of the loss and the loss; ``bounds={"alpha": (0, 3)}`` replaces a default) and flagged
    ``fit.degenerate`` with ``fit.reasons`` when the data do not identify it (an optimum on a
    bound, < 3 distinct N or D for a free exponent, a near-zero curvature;
    ``scaling.identify``). Fixing E or an exponent (``fixed={"E": 1.7}``) is the remedy.

    ``objective="huber_likelihood"`` maximises instead the Huber likelihood with a free scale
    sigma, Besiroglu et al.'s headline estimator (A = 482, B = 2085, alpha = 0.3478,
    beta = 0.3658 on their data; ``scaling.likelihood``); ``fit.sigma`` is the scale and
    ``fit.objective`` the negative log-likelihood. ``weights`` (n,) weigh each point (e.g.
    ``1 / SE^2`` of the log loss; ``scaling.weights.inverse_variance``).
    """
    return fit_form(
        forms.CHINCHILLA,
        {"N": N, "D": D},
        loss,
        huber_delta=huber_delta,
        grid=grid,
        fixed=fixed,
        asymmetry=asymmetry,
        drop_highest=drop_highest,
        max_iter=max_iter,
        bounds=bounds,
        objective=objective,
        weights=weights,
    )


def fit_frantar(
    S,
    N,
    D,
    loss,
    *,
    huber_delta: float = 1e-3,
    space: str = "log",
    grid="default",
    drop_highest: int = 0,
    fixed: Mapping[str, float] | None = None,
    asymmetry: float = 0.5,
    max_iter: int = 400,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    objective: str = "huber",
    weights=None,
) -> FrantarFit:
    """Fit the sparse law of Frantar et al. 2023, ``(a (1-S)^b + c) N^-d + e D^-f + g``.

    ``S`` is the sparsity in [0, 1), N the non-zero parameter count, D the data seen. Their
    language-model recipe is the default (Huber 1e-3 on log residuals); for ViT they used
    ``space="linear", huber_delta=0.01``. The objective is a sum (theirs is a mean: divide by n).
    Bounds and the degenerate flag as in ``fit_chinchilla`` (exponents b, d, f in [0, 2]).
    """
    return fit_form(
        forms.FRANTAR,
        {"S": S, "N": N, "D": D},
        loss,
        huber_delta=huber_delta,
        grid=grid,
        fixed=fixed,
        asymmetry=asymmetry,
        space=space,
        drop_highest=drop_highest,
        max_iter=max_iter,
        bounds=bounds,
        objective=objective,
        weights=weights,
    )
