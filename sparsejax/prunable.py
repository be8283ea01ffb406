"""Which leaves of a parameter pytree may be pruned, and why (:func:`describe`).

A *prunable predicate* is ``prunable(path, leaf) -> bool`` where ``path`` is a JAX key path
(as given by :func:`jax.tree_util.tree_flatten_with_path`). The default (docs/design.md,
"Params and the prunable predicate") selects floating-point leaves with ``ndim >= 2`` none of
whose path *components* names an embedding, a positional table, a learned token table (a ViT's
``cls_token``, ``register_tokens``, a ``mask_token``), a normalization layer, a bias or a scale
(or the dense ``lowrank`` path of a Sparse-IFT Doped layer).

Matching is by whole path component, case-insensitive, never by substring:
``ConvTranspose_0/kernel``, ``compose/kernel``, ``posterior_head/kernel`` and
``prenorm_mlp/kernel`` are prunable; ``embed/embedding``, ``pos_embed``, ``LayerNorm_0/scale``,
``final_norm/bias``, ``ln_f/scale``, ``cls_token``, ``register_tokens`` are not. A component is
tried as written (lower-cased) and with a trailing layer index removed (``LayerNorm_0`` ->
``layernorm``, ``ln_1`` -> ``ln``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import axes as axes_lib
from sparsejax.paths import components, path_str

Predicate = Callable[[tuple, Any], bool]

# Component patterns (fnmatch on a whole lower-cased component) the default keeps dense.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    # embeddings, and output heads named after them (GPT's ``unembed``)
    "embed*", "*embed", "*embeds", "*embedding", "*embeddings", "wte",
    # positional tables
    "pos", "pos_*", "position*", "wpe",
    # learned token tables: class, register, mask and prompt tokens (a ViT's ``cls_token``
    # (1, 1, D) and ``register_tokens`` (R, D) are parameters, not weight matrices)
    "cls*", "*token*", "register*",
    # normalization layers
    "*norm", "layernorm*", "batchnorm*", "groupnorm*", "rmsnorm*", "ln", "ln_*", "bn",
    # per-feature vectors
    "bias", "scale",
    # the dense low-rank path of a Sparse-IFT Doped layer (sparsejax.models.sparse_ift.SparseDoped)
    "lowrank",
)

_INDEX = re.compile(r"_?\d+$")

# What each group of DEFAULT_EXCLUDE is, for the reasons ``describe`` prints.
_LEARNED_TOKENS: tuple[str, ...] = ("cls*", "*token*", "register*")


def _matches(component: str, pattern: str) -> bool:
    """``pattern`` (a word, or ``fnmatch`` wildcards ``* ? [...]``) matches the whole
    component, or the component without its trailing index (``norm_1`` -> ``norm``)."""
    names = {component, _INDEX.sub("", component)} - {""}
    return any(fnmatch.fnmatchcase(name, pattern) for name in names)


# Embedding tables among DEFAULT_EXCLUDE (token and positional), for non-embedding counts.
EMBEDDING_PATTERNS: tuple[str, ...] = (
    "embed*", "*embed", "*embeds", "*embedding", "*embeddings", "wte",
    "pos", "pos_*", "position*", "wpe",
)


def is_embedding(path: Sequence[Any]) -> bool:
    """Whether a path names an embedding table (token, positional, or a head named after
    one such as GPT's ``unembed``), by whole path component like the default predicate."""
    return any(_matches(c, pat) for c in components(path) for pat in EMBEDDING_PATTERNS)


def leaf_dtype(leaf: Any) -> np.dtype:
    """The dtype of an array, ``ShapeDtypeStruct`` or Python scalar leaf."""
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.result_type(leaf)


class ComponentPredicate:
    """Prunable when floating point, ``ndim >= min_ndim``, and no path component matches
    one of ``patterns`` (see :func:`excluding`). :meth:`reason` says why a leaf is not."""

    def __init__(self, patterns: Sequence[str], min_ndim: int = 2):
        if not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"excluded patterns must be non-empty strings, got {patterns!r}")
        if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 0:
            raise ValueError(f"min_ndim must be an int >= 0, got {min_ndim!r}")
        self.patterns = tuple(p.lower() for p in patterns)
        self.min_ndim = min_ndim

    def reason(self, path: Sequence[Any], leaf: Any) -> str | None:
        """``None`` when the leaf is prunable, else a short reason."""
        ndim = int(np.ndim(leaf))
        if ndim < self.min_ndim:
            return f"ndim {ndim} < {self.min_ndim}"
        dtype = leaf_dtype(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            return f"{dtype.name} dtype is not floating point"
        for comp in components(path):
            for pattern in self.patterns:
                if _matches(comp, pattern):
                    what = ": a learned token table" if pattern in _LEARNED_TOKENS else ""
                    return f"component {comp!r} excluded ({pattern!r}{what})"
        return None

    def __call__(self, path: Sequence[Any], leaf: Any) -> bool:
        return self.reason(path, leaf) is None

    def __repr__(self) -> str:
        return f"excluding({', '.join(map(repr, self.patterns))}, min_ndim={self.min_ndim})"


default_prunable = ComponentPredicate(DEFAULT_EXCLUDE)
"""The default (docs/design.md, "Params and the prunable predicate"): floating point,
``ndim >= 2``, no component in :data:`DEFAULT_EXCLUDE`."""


def excluding(*patterns: str, min_ndim: int = 2) -> ComponentPredicate:
    """A predicate like the default with its own excluded path components.

    Each pattern matches a whole path component (case-insensitive), with or without its
    trailing layer index: ``"head"`` matches ``head``, ``Head_0`` and ``head1`` but not
    ``heads`` or ``forehead``; ``fnmatch`` wildcards widen it (``"head*"``: components
    starting with ``head``; ``"*_proj"``). Extend the default with
    ``excluding(*DEFAULT_EXCLUDE, "head")``.

    >>> pred = excluding("head")
    >>> pred((jax.tree_util.DictKey("Head_0"), jax.tree_util.DictKey("kernel")), np.ones((2, 2)))
    False
    >>> pred((jax.tree_util.DictKey("forehead"), jax.tree_util.DictKey("kernel")), np.ones((2, 2)))
    True
    """
    return ComponentPredicate(patterns, min_ndim)


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


def _why(pred: Predicate, path: Sequence[Any], leaf: Any) -> tuple[bool, str]:
    if isinstance(pred, ComponentPredicate):
        reason = pred.reason(path, leaf)
        return reason is None, reason or "floating point, ndim >= 2, no excluded component"
    keep = bool(pred(path, leaf))
    return keep, "custom predicate"


def describe(
    params: Any, prunable: Predicate | None = None, *, axes: bool = True,
    axis: Any = "contraction", m: int | None = None,
) -> str:
    """A table of every leaf of ``params``: path, shape, dtype, prunable yes/no and why, plus
    totals. With ``axes``, prunable leaves also show the contraction axes that N:M groups and
    block tiles follow under ``axis`` (:func:`sparsejax.axes.contraction_axes`) and, given
    ``m``, whether M divides them (such leaves fail ``methods.nm`` or are skipped with
    ``skip_indivisible=True``). ``print`` the result, or call :func:`print_description`.

    >>> print(describe({"dense": {"kernel": np.ones((4, 2)), "bias": np.ones(2)}}, axes=False))
    path          shape   dtype    prunable  why
    dense/bias    (2,)    float64  no        ndim 1 < 2
    dense/kernel  (4, 2)  float64  yes       floating point, ndim >= 2, no excluded component
    prunable: 1 of 2 leaves, 8 of 10 entries (80.0%)
    """
    pred = resolve(prunable)
    rows, n_leaves, n_yes, total, total_yes = [], 0, 0, 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keep, why = _why(pred, path, leaf)
        size = int(np.size(leaf))
        n_leaves, total = n_leaves + 1, total + size
        n_yes, total_yes = n_yes + keep, total_yes + (size if keep else 0)
        row = [path_str(path), str(tuple(np.shape(leaf))), leaf_dtype(leaf).name,
               "yes" if keep else "no", why]
        if axes:
            row.append(axes_lib.explain(path, leaf, axis, m) if keep else "")
        rows.append(row)
    header = ["path", "shape", "dtype", "prunable", "why"] + (["contraction axes"] if axes else [])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    pct = 100.0 * total_yes / total if total else 0.0
    lines.append(f"prunable: {n_yes} of {n_leaves} leaves, {total_yes} of {total} entries "
                 f"({pct:.1f}%)")
    return "\n".join(lines)


def print_description(params: Any, prunable: Predicate | None = None, **kwargs: Any) -> None:
    """``print(describe(params, prunable, **kwargs))``."""
    print(describe(params, prunable, **kwargs))
