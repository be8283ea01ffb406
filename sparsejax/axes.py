"""The contraction axes of a kernel: which axes N:M groups and block tiles follow.

A layer computes ``y = x @ W`` over the *contraction* (input) axes of its kernel. The default
``axis="contraction"`` finds them from the leaf's rank and, where the rank is ambiguous, from
its path (Flax linen and NNX conventions):

==========================================  ========================  ====================
layer                                       kernel                    contraction axes
==========================================  ========================  ====================
``Dense`` / ``nnx.Linear`` (any 2-D leaf)   ``(in, out)``             ``(0,)``
``Conv``, ``ConvTranspose`` (any 4-D leaf)  ``(H, W, Cin, Cout)``     ``(2,)`` (``Cin``)
a ``conv*`` module of another rank          ``(*window, Cin, Cout)``  ``(ndim - 2,)``
attention ``query``/``key``/``value``       ``(d, heads, head_dim)``  ``(0,)``
attention ``out``                           ``(heads, head_dim, d)``  ``(0, 1)`` flattened
==========================================  ========================  ====================

Linen ``ConvTranspose(transpose_kernel=True)`` stores ``(H, W, Cout, Cin)``: pass ``axis=-1``
for such leaves (the shape alone cannot tell). The attention rows cover linen
``MultiHeadDotProductAttention`` and ``nnx.MultiHeadAttention``
(3-D kernels whose module is named ``query``, ``key``, ``value`` or ``out``). Any other kernel
(``DenseGeneral`` with several input or output axes, custom layers) raises ``ValueError``
naming the leaf: pass an explicit ``axis`` (an int, or a tuple of consecutive axes that are
flattened) or per-leaf axes ``{"path regex": axis}``; leaves no regex matches (``re.search``
on ``"a/b/kernel"``, first match in dict order) use the default.

Several contraction axes are flattened in order: N:M groups M consecutive entries of the
``(prod(in_axes), rest)`` matrix along its first axis. Block masks tile the ``(in, out)``
matrix the layer multiplies by (conv kernels: the ``(Cin, Cout)`` matrix of each window
position, all positions competing in one selection).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import numpy as np

from sparsejax.paths import components, path_str

AxisSpec = str | int | tuple[int, ...] | Mapping[str, Any]

ATTENTION_IN: dict[str, tuple[int, ...]] = {
    "query": (0,), "key": (0,), "value": (0,), "out": (0, 1),
}


class Layout(NamedTuple):
    """Axes of a kernel seen as the matrices it multiplies by: ``batch`` axes index separate
    ``(rows, cols)`` matrices (a conv's window positions); ``rows`` are the contraction axes."""

    batch: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]


def _what(path: Sequence[Any], shape: Sequence[int]) -> str:
    name = path_str(path)
    return f"leaf {name!r} of shape {tuple(shape)}" if name else f"array of shape {tuple(shape)}"


def _module(path: Sequence[Any]) -> str:
    parts = components(path)
    return parts[-2] if len(parts) >= 2 else ""


def _is_conv(path: Sequence[Any], ndim: int) -> bool:
    return ndim == 4 or (ndim >= 3 and _module(path).startswith("conv"))


def default_axes(path: Sequence[Any], shape: Sequence[int]) -> tuple[int, ...]:
    """The contraction axes of the table above, else ``ValueError`` naming the leaf."""
    ndim = len(shape)
    if ndim == 2:
        return (0,)
    if _is_conv(path, ndim):
        return (ndim - 2,)
    module = _module(path)
    if ndim == 3 and module in ATTENTION_IN:
        return ATTENTION_IN[module]
    raise ValueError(
        f"{_what(path, shape)}: its contraction axes are not known "
        "(the default knows 2-D (in, out) kernels, HWIO/conv* kernels and attention "
        "query/key/value/out kernels); pass an explicit axis, e.g. axis=0 or axis=(0, 1) for "
        f"flattened input axes, or per-leaf axes axis={{{path_str(path)!r}: 0}}"
    )


def check_spec(axis: Any, name: str = "axis") -> None:
    """Validate the form of an axis spec (before any leaf is seen)."""
    if isinstance(axis, Mapping):
        for pattern, value in axis.items():
            if not isinstance(pattern, str):
                raise ValueError(f"{name}: keys must be path regexes (str), got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{name}: invalid regex {pattern!r}: {err}") from err
            if isinstance(value, Mapping):
                raise ValueError(f"{name}[{pattern!r}] must be an int, a tuple or 'contraction'")
            check_spec(value, f"{name}[{pattern!r}]")
        return
    if axis == "contraction":
        return
    ok_int = lambda a: isinstance(a, int | np.integer) and not isinstance(a, bool)  # noqa: E731
    if ok_int(axis) or (isinstance(axis, tuple) and axis and all(map(ok_int, axis))):
        return
    raise ValueError(
        f"{name} must be 'contraction', an int, a non-empty tuple of ints or a dict "
        f"{{path regex: axis}}, got {axis!r}"
    )


def _normalize(path: Sequence[Any], shape: Sequence[int], axes: tuple[int, ...]):
    ndim = len(shape)
    if not all(-ndim <= a < ndim for a in axes):
        raise ValueError(
            f"{_what(path, shape)}: axis {axes} out of range "
            f"[-{ndim}, {ndim})"
        )
    out = tuple(int(a) % ndim for a in axes)
    if out != tuple(range(out[0], out[0] + len(out))):
        raise ValueError(
            f"{_what(path, shape)}: flattened contraction axes must be consecutive and "
            f"increasing, got {axes}"
        )
    return out


def contraction_axes(path: Sequence[Any], leaf: Any, axis: AxisSpec = "contraction"):
    """The consecutive axes of ``leaf`` (a kernel at key path ``path``) that N:M groups follow.

    ``axis`` is ``"contraction"`` (the table in the module docstring), an int, a tuple of
    consecutive axes (flattened) or ``{"path regex": int | tuple | "contraction"}``.
    """
    shape = tuple(np.shape(leaf))
    if isinstance(axis, Mapping):
        name = path_str(path)
        axis = next((v for k, v in axis.items() if re.search(k, name)), "contraction")
    if axis == "contraction":
        return default_axes(path, shape)
    return _normalize(path, shape, (axis,) if not isinstance(axis, tuple) else axis)


def layout(path: Sequence[Any], leaf: Any, axis: AxisSpec = "contraction") -> Layout:
    """:class:`Layout` of a kernel for block masks: rows are :func:`contraction_axes`; the
    axes before them are window positions (``batch``) for a conv kernel, columns otherwise."""
    rows = contraction_axes(path, leaf, axis)
    ndim = np.ndim(leaf)
    batch = tuple(range(rows[0])) if _is_conv(path, ndim) else ()
    cols = tuple(a for a in range(ndim) if a not in rows and a not in batch)
    return Layout(batch, rows, cols)


def to_matrix(x: jax.Array, lay: Layout) -> jax.Array:
    """``x`` as ``(*batch, prod(rows), prod(cols))`` (a transpose only when axes are out of
    order)."""
    perm = lay.batch + lay.rows + lay.cols
    if perm != tuple(range(x.ndim)):
        x = x.transpose(perm)
    shape = x.shape
    nb, nr = len(lay.batch), len(lay.rows)
    return x.reshape(*shape[:nb], math.prod(shape[nb:nb + nr]), math.prod(shape[nb + nr:]))


def from_matrix(y: jax.Array, lay: Layout, shape: Sequence[int]) -> jax.Array:
    """Inverse of :func:`to_matrix` for a leaf of ``shape``."""
    perm = lay.batch + lay.rows + lay.cols
    y = y.reshape([shape[a] for a in perm])
    if perm != tuple(range(len(shape))):
        y = y.transpose(np.argsort(perm))
    return y


def _kind(path: Sequence[Any], ndim: int) -> str:
    if ndim == 2:
        return "in of (in, out)"
    if _is_conv(path, ndim):
        return "Cin of conv"
    module = _module(path)
    return "d of attention " + module if module != "out" else "heads*head_dim of attention out"


def explain(
    path: Sequence[Any], leaf: Any, axis: AxisSpec = "contraction", m: int | None = None
) -> str:
    """A short description of the contraction axes (or why there are none) for a table;
    with ``m``, also whether M divides them."""
    try:
        axes = contraction_axes(path, leaf, axis)
    except ValueError:
        return "unknown: pass axis= or per-leaf axes"
    shape = np.shape(leaf)
    size = math.prod(shape[a] for a in axes)
    explicit = isinstance(axis, int | tuple) or (
        isinstance(axis, Mapping) and any(re.search(k, path_str(path)) for k in axis)
    )
    text = f"{axes} {'explicit' if explicit else _kind(path, len(shape))}, size {size}"
    if m is not None and size % m:
        text += f"; m={m} does not divide it"
    return text


@dataclass
class Plan:
    """Per prunable leaf (keyed by ``path_str``): its contraction ``axes``, or why it was
    ``skipped`` (left dense)."""

    axes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layouts: dict[str, Layout] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{k}: axes {v}" for k, v in self.axes.items()]
        lines += [f"{k}: skipped (dense): {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


def plan(
    tree: Any,
    prunable: Any,
    axis: AxisSpec,
    problem: Callable[[tuple[int, ...], Layout], str | None],
    *,
    skip_indivisible: bool,
    what: str,
) -> Plan:
    """Resolve the axes of every prunable leaf of ``tree`` (params or scores).

    ``problem(shape, layout)`` says why a leaf's shape does not fit the pattern (``None`` when
    it does). All such leaves are listed in one ``ValueError``, or skipped with
    ``skip_indivisible``; leaves of unknown layout, and regexes of ``axis`` that match no
    prunable leaf, always raise.
    """
    check_spec(axis)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flags = treedef.flatten_up_to(prunable)
    out, unknown, bad = Plan(), [], []
    used: set[str] = set()
    for (path, leaf), keep in zip(flat, flags, strict=True):
        if not keep:
            continue
        name = path_str(path)
        if isinstance(axis, Mapping):
            used.update(k for k in axis if re.search(k, name))
        try:
            lay = layout(path, leaf, axis)
        except ValueError as err:
            unknown.append(str(err))
            continue
        issue = problem(tuple(np.shape(leaf)), lay)
        if issue is None:
            out.axes[name], out.layouts[name] = lay.rows, lay
        elif skip_indivisible:
            out.skipped[name] = issue
        else:
            bad.append(f"{name}: {issue}")
    if unknown:
        raise ValueError(f"{what}: " + "; ".join(unknown))
    if isinstance(axis, Mapping) and (unused := [k for k in axis if k not in used]):
        raise ValueError(f"{what}: per-leaf axis regexes {unused} match no prunable leaf")
    if bad:
        raise ValueError(
            f"{what}: {len(bad)} prunable leaves do not fit: " + "; ".join(bad)
            + " (pass skip_indivisible=True to leave them dense, or choose their axes with "
            "axis={'path regex': axis})"
        )
    return out
