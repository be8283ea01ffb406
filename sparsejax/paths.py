"""Key paths of parameter pytrees as text: :func:`path_str` (``"a/b/0/kernel"``) and
:func:`components` (lower-cased parts, NNX's ``.value`` dropped). Shared by the prunable
predicate, the axis specs, masks and the run framework; it imports nothing of sparsejax."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def path_str(path: Sequence[Any]) -> str:
    """Render a key path as ``"a/b/0/kernel"`` (names as written, no brackets)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def components(path: Sequence[Any]) -> list[str]:
    """Lower-cased path components, without the ``.value`` attribute of an NNX variable."""
    parts = path_str(path).lower().split("/")
    if path and getattr(path[-1], "name", None) == "value":  # nnx.State: ".../kernel/.value"
        parts = parts[:-1]
    return parts
