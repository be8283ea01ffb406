"""Checks on an export file before anything in it is used: checksums, then the structure of
every leaf, so a damaged or hand-edited file is refused with one error naming the file and
the field instead of loading wrong weights.

* **Checksums**: :func:`tensor_sha256` (SHA-256 of a tensor's dtype, shape and little-endian
  bytes) of every tensor is recorded at export and compared on load (:func:`check_checksums`).
* **BSR** (Gray et al. 2017, ``pallas_kernels.block_sparse.format``): ``shape`` ``(K, N)``
  and ``block`` ``(bk, bn)`` positive ints, ``bk | K`` and ``bn | N``; ``rows`` and ``cols``
  1-D integer tensors of equal length ``nnz <= (K/bk)(N/bn)``, in range, and in strictly
  increasing CSC order (by column, then row), hence unique; ``values`` ``(nnz, bk, bn)``.
* **N:M** (Mishra et al. 2021, ``pallas_kernels.nm.format``): ints ``2 <= m``,
  ``1 <= n <= m``, ``m | K``; ``values`` ``(K n/m, N)``; ``codes`` the exact container dtype
  and shape of :func:`~pallas_kernels.nm.format.code_layout`, every group's ``n`` positions
  ``< m`` and strictly increasing, and unused bits zero (the codes re-pack to themselves).

Every failure raises :class:`ExportFileError` (an :class:`~sparsejax.errors.InputError`, so
the CLI prints one ``sparsejax: error:`` line and exits 2).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from pallas_kernels.nm.format import code_layout
from sparsejax import errors

KINDS = ("dense", "bsr", "nm")
_KEYS = {"dense": ("values",), "bsr": ("values", "rows", "cols"), "nm": ("values", "codes")}


class ExportFileError(errors.InputError):
    """An export file (or a safetensors file) that is malformed or damaged; the message names
    the file and the field."""


def fail(path: str | Path, field: str, problem: str) -> ExportFileError:
    """The error for ``field`` of ``path`` (raise it)."""
    return ExportFileError(f"{path}: {field}: {problem}")


def little_endian(a: np.ndarray) -> np.ndarray:
    """``a`` C-contiguous with little-endian items (its values unchanged)."""
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a


def tensor_sha256(a: Any) -> str:
    """SHA-256 of a tensor's dtype name, shape and little-endian bytes."""
    a = little_endian(np.asarray(a))
    h = hashlib.sha256(f"{a.dtype.name}{list(a.shape)}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def check_checksums(path: str | Path, tensors: dict[str, np.ndarray], recorded: Any) -> None:
    """Every tensor has a recorded checksum equal to its :func:`tensor_sha256`, and nothing
    else is recorded."""
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise fail(path, "sha256", "must map each tensor name to a hex SHA-256 string")
    if set(recorded) != set(tensors):
        missing, extra = sorted(set(tensors) - set(recorded)), sorted(set(recorded) - set(tensors))
        raise fail(path, "sha256", f"does not list the file's tensors (no checksum for "
                   f"{missing}, checksums of absent tensors {extra})")
    for name, arr in tensors.items():
        if tensor_sha256(arr) != recorded[name]:
            raise fail(path, f"tensor {name!r}", "does not match the SHA-256 recorded at export "
                       "(the file was changed or damaged); export the run again")


def _int(path, field: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise fail(path, field, f"must be an int >= {low}, got {value!r}")
    return value


def _pair(path, field: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise fail(path, field, f"must be a list of two ints >= 1, got {value!r}")
    return _int(path, field, value[0], 1), _int(path, field, value[1], 1)


def _tensor(path, tensors, field: str, name: Any, kinds: str, shape=None) -> np.ndarray:
    if not isinstance(name, str) or name not in tensors:
        raise fail(path, field, f"names tensor {name!r}, which the file does not hold")
    arr = tensors[name]
    floating = kinds == "f" and jnp.issubdtype(arr.dtype, jnp.floating)  # bfloat16 too
    if arr.dtype.kind not in kinds and not floating:
        want = {"f": "floating", "iu": "integer", "u": "unsigned"}.get(kinds, kinds)
        raise fail(path, f"tensor {name!r}", f"dtype {arr.dtype} is not {want}")
    if shape is not None and arr.shape != tuple(shape):
        raise fail(path, f"tensor {name!r}", f"shape {arr.shape}, expected {tuple(shape)}")
    return arr


def check_layout(path: str | Path, layout: Any, tensors: dict[str, np.ndarray]) -> None:
    """Every leaf entry of an export's ``layout`` is valid and uses only the file's tensors,
    and every tensor belongs to exactly one leaf."""
    if not isinstance(layout, dict) or not layout:
        raise fail(path, "layout", f"must be a non-empty object of leaves, got {layout!r:.80}")
    used: dict[str, str] = {}
    for leaf, info in layout.items():
        where = f"layout[{leaf!r}]"
        if not isinstance(info, dict):
            raise fail(path, where, f"must be an object, got {info!r:.80}")
        kind = info.get("kind")
        if kind not in KINDS:
            raise fail(path, f"{where}.kind", f"unknown layout {kind!r} (one of {KINDS})")
        for key in _KEYS[kind]:
            if key not in info:
                raise fail(path, where, f"missing key {key!r} (a {kind} leaf has {_KEYS[kind]})")
            name = info[key]
            if isinstance(name, str) and name in used:
                raise fail(path, f"{where}.{key}", f"tensor {name!r} is already {used[name]}")
            used[str(name)] = f"{where}.{key}"
        if kind == "dense":
            _tensor(path, tensors, f"{where}.values", info["values"], "f")
        elif kind == "bsr":
            check_bsr(path, where, info, tensors)
        else:
            check_nm(path, where, info, tensors)
    extra = sorted(set(tensors) - set(used))
    if extra:
        raise fail(path, "layout", f"tensors {extra} belong to no leaf")


def check_bsr(path: str | Path, where: str, info: dict[str, Any],
              tensors: dict[str, np.ndarray]) -> None:
    """A BSR leaf (module docstring)."""
    k, n = _pair(path, f"{where}.shape", info.get("shape"))
    bk, bn = _pair(path, f"{where}.block", info.get("block"))
    if k % bk or n % bn:
        raise fail(path, f"{where}.block", f"({bk}, {bn}) does not divide shape ({k}, {n})")
    gk, gn = k // bk, n // bn
    rows = _tensor(path, tensors, f"{where}.rows", info["rows"], "iu")
    cols = _tensor(path, tensors, f"{where}.cols", info["cols"], "iu")
    for name, idx, size in ((info["rows"], rows, gk), (info["cols"], cols, gn)):
        if idx.ndim != 1 or idx.shape != rows.shape:
            raise fail(path, f"tensor {name!r}", f"shape {idx.shape}; rows and cols must be "
                       f"1-D of one length, got {rows.shape} and {cols.shape}")
        bad = np.flatnonzero((idx < 0) | (idx >= size))
        if bad.size:
            raise fail(path, f"tensor {name!r}", f"block index {int(idx[bad[0]])} at position "
                       f"{int(bad[0])} is out of range [0, {size})")
    if rows.size > gk * gn:
        raise fail(path, f"{where}.rows", f"{rows.size} blocks, more than the {gk}x{gn} grid")
    key = cols.astype(np.int64) * gk + rows.astype(np.int64)  # CSC order: column, then row
    step = np.diff(key)
    if (step == 0).any():
        i = int(np.flatnonzero(step == 0)[0]) + 1
        raise fail(path, f"{where}.rows/cols", f"block ({int(rows[i])}, {int(cols[i])}) is "
                   f"stored twice (positions {i - 1} and {i})")
    if (step < 0).any():
        i = int(np.flatnonzero(step < 0)[0]) + 1
        raise fail(path, f"{where}.rows/cols", f"blocks are not in CSC order (by column, then "
                   f"row): block {i} ({int(rows[i])}, {int(cols[i])}) comes after "
                   f"({int(rows[i - 1])}, {int(cols[i - 1])})")
    _tensor(path, tensors, f"{where}.values", info["values"], "f", (rows.size, bk, bn))


def nm_codes(indices: np.ndarray, n: int, m: int, container: Any) -> np.ndarray:
    """Pack ``(n, G, N)`` in-group positions as ``pallas_kernels``' N:M codes (numpy)."""
    groups = indices.shape[1]
    b, p, _ = code_layout(groups, n, m)
    code = np.zeros(indices.shape[1:], np.uint64)
    for t in range(n):
        code |= indices[t].astype(np.uint64) << np.uint64(t * b)
    r = groups // p
    packed = np.zeros((r, indices.shape[2]), np.uint64)
    for s in range(p):
        packed |= code[s * r:(s + 1) * r] << np.uint64(s * n * b)
    return packed.astype(container)


def nm_indices(codes: np.ndarray, n: int, m: int, groups: int) -> np.ndarray:
    """``(n, G, N)`` in-group positions held by N:M ``codes`` (numpy)."""
    b, p, _ = code_layout(groups, n, m)
    c = codes.astype(np.uint64)
    per_group = np.concatenate([c >> np.uint64(s * n * b) for s in range(p)], axis=0)
    mask = np.uint64((1 << b) - 1)
    return np.stack([(per_group >> np.uint64(t * b)) & mask for t in range(n)]).astype(np.int64)


def check_nm(path: str | Path, where: str, info: dict[str, Any],
             tensors: dict[str, np.ndarray]) -> None:
    """An N:M leaf (module docstring)."""
    k, cols = _pair(path, f"{where}.shape", info.get("shape"))
    m = _int(path, f"{where}.m", info.get("m"), 2)
    n = info.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= m:
        raise fail(path, f"{where}.n", f"must be an int with 1 <= n <= m = {m}, got {n!r}")
    if k % m:
        raise fail(path, f"{where}.m", f"m = {m} does not divide K = {k}")
    groups = k // m
    try:
        _, p, container = code_layout(groups, n, m)
    except ValueError as e:
        raise fail(path, f"{where}.n", str(e)) from None
    _tensor(path, tensors, f"{where}.values", info["values"], "f", (n * groups, cols))
    codes = _tensor(path, tensors, f"{where}.codes", info["codes"], "u", (groups // p, cols))
    if codes.dtype != np.dtype(container):
        raise fail(path, f"tensor {info['codes']!r}", f"dtype {codes.dtype}, {n}:{m} codes of "
                   f"{groups} groups are {np.dtype(container)}")
    idx = nm_indices(codes, n, m, groups)
    bad = (idx >= m).any(axis=0) | (np.diff(idx, axis=0) <= 0).any(axis=0)
    if bad.any():
        g, c = (int(v[0]) for v in np.nonzero(bad))
        raise fail(path, f"tensor {info['codes']!r}", f"group {g} of column {c} holds positions "
                   f"{idx[:, g, c].tolist()}, not {n} distinct increasing positions < {m}")
    if not np.array_equal(nm_codes(idx, n, m, container), codes):
        raise fail(path, f"tensor {info['codes']!r}", "has bits set outside its packed "
                   "positions (corrupted codes)")
