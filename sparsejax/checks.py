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
