"""Scaling-law forms written as log-sum-exp-linear models (see ``scaling.solver``).

- Chinchilla (Hoffmann et al. 2022; parameterisation and grid of Besiroglu et al. 2024,
  "Chinchilla Scaling: A replication attempt"): ``L = E + A/N^alpha + B/D^beta`` is
  ``log L = LSE(a - alpha log N, b - beta log D, e)`` with ``A, B, E = exp(a), exp(b), exp(e)``.
  For sparse runs N is the average parameter count over training (Jin et al. 2025, "The
  Journey Matters").
- Frantar et al. 2023, "Scaling Laws for Sparsely-Connected Foundation Models":
  ``L = (a (1 - S)^b + c) N^-d + e D^-f + g`` is
  ``log L = LSE(log a + b log(1 - S) - d log N, log c - d log N, log e - f log D, log g)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from scaling.solver import LSEModel


class Form(NamedTuple):
    """A law: internal parameters (theta order), which are logs of the natural coefficient."""

    name: str
    internal: tuple[str, ...]  # theta order
    natural: tuple[str, ...]  # natural coefficient for each internal parameter (same order)
    is_log: tuple[bool, ...]  # natural = exp(internal) where True
    columns: tuple[str, ...]  # data columns the design needs
    design: Callable[[Mapping[str, np.ndarray]], np.ndarray]  # data -> (K, n, P)
    grids: Mapping[str, Mapping[str, tuple[float, ...]]]  # grid name -> internal -> values
    # exponent -> (the data column it is the power of, the coefficient that offsets that
    # column's term): a free exponent needs >= 3 distinct column values while the offset is free
    exponents: Mapping[str, tuple[str, str]]


def _chinchilla_design(data: Mapping[str, np.ndarray]) -> np.ndarray:
    x, y = np.log(data["N"]), np.log(data["D"])
    m = np.zeros((3, x.shape[0], 5))
    m[0, :, 0], m[0, :, 3] = 1.0, -x  # a - alpha log N
    m[1, :, 1], m[1, :, 4] = 1.0, -y  # b - beta log D
    m[2, :, 2] = 1.0  # e
    return m


def _frantar_design(data: Mapping[str, np.ndarray]) -> np.ndarray:
    s, x, y = np.log1p(-data["S"]), np.log(data["N"]), np.log(data["D"])
    m = np.zeros((4, x.shape[0], 7))
    m[0, :, 0], m[0, :, 1], m[0, :, 3] = 1.0, s, -x  # log a + b log(1-S) - d log N
    m[1, :, 2], m[1, :, 3] = 1.0, -x  # log c - d log N
    m[2, :, 4], m[2, :, 5] = 1.0, -y  # log e - f log D
    m[3, :, 6] = 1.0  # log g
    return m


_EPOCH = {  # docs/design.md, "Scaling": 6 * 6 * 5 * 5 * 5 = 4,500 starts
    "a": tuple(np.arange(0.0, 26.0, 5.0)),
    "b": tuple(np.arange(0.0, 26.0, 5.0)),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
_COARSE = {
    "a": (0.0, 10.0, 20.0),
    "b": (0.0, 10.0, 20.0),
    "e": (-1.0, 0.0, 1.0),
    "alpha": (0.0, 0.5, 1.0),
    "beta": (0.0, 0.5, 1.0),
}

CHINCHILLA = Form(
    name="chinchilla",
    internal=("a", "b", "e", "alpha", "beta"),
    natural=("A", "B", "E", "alpha", "beta"),
    is_log=(True, True, True, False, False),
    columns=("N", "D"),
    design=_chinchilla_design,
    grids={"epoch": _EPOCH, "coarse": _COARSE},
    exponents={"alpha": ("N", "E"), "beta": ("D", "E")},
)

_FRANTAR_GRID = {
    "log_a": (-1.0, 1.0, 3.0),
    "b": (0.5, 1.5),
    "log_c": (-1.0, 1.0, 3.0),
    "d": (0.2, 0.5, 1.0),
    "log_e": (-1.0, 1.0, 3.0),
    "f": (0.2, 0.5, 1.0),
    "log_g": (0.0, 1.0, 2.0),
}
_FRANTAR_COARSE = {
    "log_a": (0.0, 2.0),
    "b": (1.0,),
    "log_c": (0.0, 2.0),
    "d": (0.3, 0.8),
    "log_e": (0.0, 2.0),
    "f": (0.3, 0.8),
    "log_g": (0.0, 1.0),
}

FRANTAR = Form(
    name="frantar",
    internal=("log_a", "b", "log_c", "d", "log_e", "f", "log_g"),
    natural=("a", "b", "c", "d", "e", "f", "g"),
    is_log=(True, False, True, False, True, False, True),
    columns=("S", "N", "D"),
    design=_frantar_design,
    grids={"default": _FRANTAR_GRID, "epoch": _FRANTAR_GRID, "coarse": _FRANTAR_COARSE},
    exponents={"b": ("S", "c"), "d": ("N", "g"), "f": ("D", "g")},
)


def to_natural(form: Form, theta: np.ndarray) -> dict[str, float]:
    """Natural coefficients from one internal parameter vector."""
    return {
        nat: float(np.exp(v) if lg else v)
        for nat, lg, v in zip(form.natural, form.is_log, np.asarray(theta), strict=True)
    }


def to_internal(form: Form, name: str, value: float) -> float:
    """Internal value of the natural coefficient ``name`` (validated: logs need value > 0)."""
    if name not in form.natural:
        raise ValueError(f"fixed: unknown parameter {name!r}; valid: {', '.join(form.natural)}")
    lg = form.is_log[form.natural.index(name)]
    if not np.isfinite(value) or (lg and value <= 0):
        raise ValueError(f"fixed[{name!r}] must be finite{' and > 0' if lg else ''}; got {value}")
    return float(np.log(value)) if lg else float(value)


def build_model(
    form: Form, data: Mapping[str, np.ndarray], target: np.ndarray, fixed: Mapping[str, float]
) -> tuple[LSEModel, np.ndarray, np.ndarray]:
    """The model over the free parameters; returns it, the free mask and the fixed values."""
    m = form.design(data)
    free = np.ones(len(form.internal), bool)
    values = np.zeros(len(form.internal))
    for name, value in fixed.items():
        j = form.natural.index(name) if name in form.natural else -1
        values[j] = to_internal(form, name, value)
        free[j] = False
    offset = np.einsum("knp,p->kn", m[:, :, ~free], values[~free])
    return LSEModel(np.ascontiguousarray(m[:, :, free]), offset, target), free, values


def grid_starts(form: Form, grid, free: np.ndarray) -> np.ndarray:
    """Starts over the free parameters: a named grid, a dict of values, or an (S, P) array."""
    if isinstance(grid, str):
        if grid not in form.grids:
            raise ValueError(f"grid must be one of {sorted(form.grids)} or an array; got {grid!r}")
        grid = form.grids[grid]
    if isinstance(grid, Mapping):
        names = [n for n, f in zip(form.internal, free, strict=True) if f]
        missing = [n for n in names if n not in grid]
        if missing:
            raise ValueError(f"grid lacks values for {missing}; it needs {names}")
        return np.array(list(itertools.product(*(grid[n] for n in names))), np.float64)
    starts = np.atleast_2d(np.asarray(grid, np.float64))
    if starts.shape[1] != free.sum() or not np.all(np.isfinite(starts)):
        raise ValueError(
            f"grid array must be finite with {free.sum()} columns ({form.internal} less fixed); "
            f"got shape {starts.shape}"
        )
    return starts
