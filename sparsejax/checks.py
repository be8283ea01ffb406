"""Argument checks shared by the public constructors: raise ``ValueError`` naming the argument
and its valid range, in plain Python, before anything is traced."""

from __future__ import annotations

from typing import Any

import numpy as np


def sparsity(name: str, value: Any) -> float:
    """``value`` as a float in ``[0, 1)``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def integer(name: str, value: Any, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``, else ``ValueError`` naming ``name``."""
    valid = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {valid}, got {value}")
    return int(value)


def positive_ints(**values: Any) -> None:
    """Check every keyword is an int >= 1 (``ValueError`` naming the first that is not)."""
    for name, value in values.items():
        integer(name, value, 1)
