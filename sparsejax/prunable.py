"""Which leaves of a parameter pytree may be pruned.

A *prunable predicate* is ``prunable(path, leaf) -> bool`` where ``path`` is a JAX key path
(as given by :func:`jax.tree_util.tree_flatten_with_path`). The default (DESIGN.md, "Core
contracts") selects leaves with ``ndim >= 2`` whose path names none of ``embed``, ``norm``,
``bias``, ``pos``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

Predicate = Callable[[tuple, Any], bool]

DEFAULT_EXCLUDE: tuple[str, ...] = ("embed", "norm", "bias", "pos")


def path_str(path: Sequence[Any]) -> str:
    """Render a key path as ``"a/b/0/kernel"`` (lower-cased names, no brackets)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def default_prunable(path: Sequence[Any], leaf: Any) -> bool:
    """DESIGN.md's default: ``ndim >= 2`` and no ``embed/norm/bias/pos`` in the path."""
    if getattr(leaf, "ndim", 0) < 2:
        return False
    name = path_str(path).lower()
    return not any(word in name for word in DEFAULT_EXCLUDE)


def excluding(*words: str, min_ndim: int = 2) -> Predicate:
    """A predicate like the default with a custom list of excluded path substrings."""
    lowered = tuple(w.lower() for w in words)

    def predicate(path: Sequence[Any], leaf: Any) -> bool:
        if getattr(leaf, "ndim", 0) < min_ndim:
            return False
        name = path_str(path).lower()
        return not any(w in name for w in lowered)

    return predicate


def resolve(prunable: Predicate | None) -> Predicate:
    """``None`` means :func:`default_prunable`; a callable is returned as is."""
    if prunable is None:
        return default_prunable
    if not callable(prunable):
        raise ValueError(
            f"prunable must be a callable (path, leaf) -> bool or None, got {type(prunable)!r}"
        )
    return prunable


def prunable_tree(params: Any, prunable: Predicate | None = None) -> Any:
    """A pytree shaped like ``params`` holding Python bools: which leaves are prunable."""
    pred = resolve(prunable)
    return jax.tree_util.tree_map_with_path(lambda p, x: bool(pred(p, x)), params)


def check_selects_something(params: Any, prunable: Predicate | None = None) -> Any:
    """Return :func:`prunable_tree`, raising ``ValueError`` if it selects no leaf."""
    tree = prunable_tree(params, prunable)
    if not any(jax.tree_util.tree_leaves(tree)):
        names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(
            "prunable: the predicate selects no leaf of params; at least one leaf must be "
            f"prunable. Leaves are: {names[:20]}{' ...' if len(names) > 20 else ''}"
        )
    return tree
