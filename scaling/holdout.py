"""Extrapolation tests: fit on some runs, predict the others (issue 25).

Leave-one-out (``scaling.compare``) asks how well a law interpolates. The question a sparse
scaling study asks is an extrapolation: fit on the dense runs and predict the sparse ones (does
N_avg, Jin et al. 2025, carry a dense law over to sparse training?), or fit on the smaller
budgets and predict the largest. ``holdout`` fits the law on every run but the held-out ones,
once per N definition, and reports the RMSE of log loss over the held-out runs,
``sqrt(mean_i log(pred_i / obs_i)^2)``, and each held-out run's error.

Held-out sets (``select``):
- ``largest-D``: the runs at the largest D (tokens);
- ``largest-N``: the runs of the largest model, by total parameter count (``n_params``; a
  CSV's N where it has no ``n_params``): the same runs whatever N the law uses;
- ``sparse``: the runs with a sparsity > 0;
- any other text is a glob (``fnmatch``) over run names (a CSV's ``name``/``run`` column, or
  its row numbers from 0), e.g. ``'size-mini_*'``; several separated by commas.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from scaling import logs
from scaling.compare import COMPARED, LABELS, fit_table
from scaling.weights import table_weights

__all__ = ["HoldoutResult", "format_holdout", "holdout", "select"]

SELECTORS = ("largest-D", "largest-N", "sparse")


class HoldoutResult(NamedTuple):
    n_key: str
    label: str
    held: tuple[str, ...]  # held-out run names
    observed: np.ndarray  # (h,) held-out losses
    predicted: np.ndarray  # (h,) by the law fitted on the other runs
    log_error: np.ndarray  # (h,) log(predicted / observed)
    rmse: float  # sqrt(mean(log_error^2))
    train_rmse: float  # in-sample RMSE of log loss on the runs fitted
    n_train: int
    reasons: tuple[str, ...]  # why the fit on the rest is degenerate (empty: it is not)
    fit: object


def select(table: logs.ScalingTable, spec: str) -> np.ndarray:
    """Boolean mask of the held-out rows of ``table`` for ``spec`` (module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--holdout must be one of {', '.join(SELECTORS)} or a glob; got {spec!r}")
    if spec == "largest-D":
        mask = table.D == table.D.max()
    elif spec == "largest-N":
        total = table.n_total if table.n_total is not None else table.N
        mask = total == total.max()
    elif spec == "sparse":
        if table.S is None:
            raise ValueError("--holdout sparse needs a sparsity column (S or sparsity)")
        mask = table.S > 0
    else:
        globs = [g.strip() for g in spec.split(",") if g.strip()]
        mask = np.array([any(fnmatch.fnmatchcase(n, g) for g in globs) for n in table.names])
    if not mask.any():
        raise ValueError(f"--holdout {spec} matches no run (runs: {', '.join(table.names[:5])}"
                         f"{', ...' if len(table.names) > 5 else ''})")
    if mask.all():
        raise ValueError(f"--holdout {spec} holds out every run; nothing is left to fit")
    return mask


def _predict(fit, table: logs.ScalingTable) -> np.ndarray:
    if "S" in fit.data:
        return fit.predict(table.S, table.N, table.D)
    return fit.predict(table.N, table.D)


def holdout(
    source,
    spec: str,
    *,
    law: str = "chinchilla",
    n_keys: tuple[str, ...] | None = None,
    fixed: Mapping[str, float] | None = None,
    **fit_kwargs,
) -> list[HoldoutResult]:
    """Fit ``law`` on the runs of ``source`` that ``spec`` does not hold out and predict those
    it does, once per N in ``n_keys`` (default: the source's own N; ``COMPARED`` compares
    N_avg, N_final and N_total). The held-out set is chosen once, so every N is tested on the
    same runs. ``fit_kwargs`` go to the fit (``grid``, ``huber_delta``, ``objective``,
    ``weights``: an (n,) array over all runs, or ``"se"`` for inverse-variance weights)."""
    keys = n_keys or (None,)
    results, names, mask = [], None, None
    weights = fit_kwargs.pop("weights", None)
    for key in keys:
        try:
            table = logs.load_table(source, n_key=key)
        except logs.MissingField as err:
            raise ValueError(f"holdout with N = {key} needs that summary field: {err}") from None
        if names is None:
            names, mask = table.names, select(table, spec)
        elif table.names != names:
            raise ValueError(f"N = {key} loads different runs than N = {keys[0]}")
        w = table_weights(table, weights)
        train, test = table.subset(~mask), table.subset(mask)
        fit = fit_table(train, law, fixed=fixed,
                        weights=None if w is None else w[~mask], **fit_kwargs)
        pred = _predict(fit, test)
        err = np.log(pred / test.loss)
        train_err = np.log(_predict(fit, train) / train.loss)
        key = key or table.n_key
        results.append(HoldoutResult(
            key, LABELS.get(key, key), test.names, test.loss, pred, err,
            float(np.sqrt(np.mean(err**2))), float(np.sqrt(np.mean(train_err**2))),
            int(train.loss.shape[0]), fit.reasons, fit))
    return results


def format_holdout(results: list[HoldoutResult], spec: str) -> str:
    """Summary per N (held-out RMSE, best marked) and each held-out run's error per N."""
    best = min(range(len(results)), key=lambda i: results[i].rmse)
    r0 = results[0]
    lines = [f"holdout {spec}: fit on {r0.n_train} runs, predict {len(r0.held)}",
             f"{'N used':<20} {'held-out RMSE log L':>20} {'fit RMSE log L':>15}  flag",
             f"{'-' * 20} {'-' * 20} {'-' * 15}  {'-' * 10}"]
    for i, r in enumerate(results):
        flag = "DEGENERATE" if r.reasons else ("best" if i == best and len(results) > 1 else "")
        lines.append(f"{r.label:<20} {r.rmse:>20.6g} {r.train_rmse:>15.4g}  {flag}")
    lines.append("")
    width = max(len(n) for n in r0.held)
    head = f"{'held-out run':<{width}} {'loss':>8} " + " ".join(
        f"{'log err ' + r.label.split(' ')[0]:>16}" for r in results)
    lines.append(head)
    for j, name in enumerate(r0.held):
        lines.append(f"{name:<{width}} {r0.observed[j]:>8.4f} " + " ".join(
            f"{r.log_error[j]:>+16.5f}" for r in results))
    return "\n".join(lines)


__all__ += ["COMPARED"]
