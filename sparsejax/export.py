"""Export the prunable 2-D kernels of a (pruned) params pytree to BSR or N:M storage.

``export_params`` converts, ``save_export``/``load_export`` persist to one ``.npz`` file
(numpy arrays plus a JSON ``__meta__`` entry; bfloat16 stored bit-exactly as uint16), and
``summary_table`` lists shape, density and compressed vs dense bytes per leaf. ``main`` is
the entry point for ``sparsejax export --format bsr|nm RUN_DIR``. The formats are
``pallas_kernels``' (which never imports ``sparsejax``); which leaves are prunable is
``sparsejax.prunable``'s rule.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse.format import BSRLayout, BSRMatrix
from pallas_kernels.nm.format import NMMatrix
from sparsejax.prunable import Predicate, path_str, resolve

Exported = dict[str, Any]
FORMATS = ("bsr", "nm")


def _to_bsr(name: str, leaf: np.ndarray, block: tuple[int, int]):
    bk, bn = block
    if leaf.shape[0] % bk or leaf.shape[1] % bn:
        return leaf, f"kept dense: shape {leaf.shape} not divisible by block {block}"
    return BSRMatrix.from_dense(leaf, block=block), ""


def _to_nm(name: str, leaf: np.ndarray, n: int, m: int, force: bool):
    if leaf.shape[0] % m:
        raise ValueError(f"leaf {name!r}: K = {leaf.shape[0]} is not divisible by m = {m}")
    try:
        return NMMatrix.from_dense(leaf, n, m, prune=force)
    except ValueError as err:
        raise ValueError(
            f"leaf {name!r} is not {n}:{m} sparse along axis 0 ({err}); it must be pruned "
            f"{n}:{m} first (or pass force=True to magnitude-prune it now)"
        ) from None


def export_params(
    params: Any,
    fmt: str,
    *,
    block: tuple[int, int] = (128, 128),
    n: int = 2,
    m: int = 4,
    prunable: Predicate | None = None,
    force: bool = False,
) -> Exported:
    """``{path_str: BSRMatrix | NMMatrix | np.ndarray}`` for every leaf of ``params``.

    Prunable 2-D leaves (``sparsejax.prunable`` predicate; default: ndim >= 2 and no
    embed/norm/bias/pos in the path) become ``fmt`` (``"bsr"`` or ``"nm"``); everything else
    (and BSR leaves whose shape the block does not divide) stays a dense numpy array.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    pred = resolve(prunable)
    out: Exported = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        arr = np.asarray(leaf)
        if not (pred(path, leaf) and arr.ndim == 2):
            out[name] = arr
        elif fmt == "bsr":
            out[name], reason = _to_bsr(name, arr, block)
            if reason:
                warnings.warn(f"export: leaf {name!r} {reason}", stacklevel=2)
        else:
            out[name] = _to_nm(name, arr, n, m, force)
    return out


def _store(arr) -> tuple[np.ndarray, str]:
    a = np.asarray(arr)
    name = str(a.dtype)
    if a.dtype.kind == "V" or name == "bfloat16":
        a = a.view(f"uint{8 * a.dtype.itemsize}")
    return a, name


def _restore(a: np.ndarray, dtype: str) -> np.ndarray:
    return a.view(jnp.dtype(dtype)) if str(a.dtype) != dtype else a


def save_export(path: str | Path, exported: Exported) -> Path:
    """Write ``exported`` to one ``.npz`` file (suffix added if missing); returns its path."""
    path = Path(path).with_suffix(".npz")
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for i, (name, obj) in enumerate(exported.items()):
        key = f"a{i}"
        if isinstance(obj, BSRMatrix):
            arrays[key + "_values"], dt = _store(obj.values)
            arrays[key + "_rows"] = obj.layout.rows
            arrays[key + "_cols"] = obj.layout.cols
            meta[name] = dict(
                key=key, kind="bsr", dtype=dt, shape=list(obj.shape), block=list(obj.block)
            )
        elif isinstance(obj, NMMatrix):
            arrays[key + "_values"], dt = _store(obj.values)
            arrays[key + "_codes"] = np.asarray(obj.codes)
            meta[name] = dict(key=key, kind="nm", dtype=dt, shape=list(obj.shape), n=obj.n, m=obj.m)
        else:
            arrays[key + "_values"], dt = _store(obj)
            meta[name] = dict(key=key, kind="dense", dtype=dt)
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def load_export(path: str | Path) -> Exported:
    """Inverse of :func:`save_export`."""
    out: Exported = {}
    with np.load(Path(path), allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"]))
        for name, info in meta.items():
            key = info["key"]
            values = _restore(data[key + "_values"], info["dtype"])
            if info["kind"] == "bsr":
                layout = BSRLayout(
                    tuple(info["shape"]),
                    tuple(info["block"]),
                    data[key + "_rows"],
                    data[key + "_cols"],
                )
                out[name] = BSRMatrix(jnp.asarray(values), layout)
            elif info["kind"] == "nm":
                out[name] = NMMatrix(
                    jnp.asarray(values),
                    jnp.asarray(data[key + "_codes"]),
                    tuple(info["shape"]),
                    info["n"],
                    info["m"],
                )
            else:
                out[name] = values
    return out


def _row(name: str, obj) -> tuple[str, str, str, float, int, int]:
    if isinstance(obj, BSRMatrix):
        dense = np.asarray(obj.to_dense())
        fmt = f"bsr {obj.block[0]}x{obj.block[1]}"
        nbytes, dbytes = obj.nbytes(), obj.dense_nbytes()
    elif isinstance(obj, NMMatrix):
        dense = np.asarray(obj.to_dense())
        fmt = f"nm {obj.n}:{obj.m}"
        nbytes, dbytes = obj.nbytes(), obj.dense_nbytes()
    else:
        dense = np.asarray(obj)
        fmt = "dense"
        nbytes = dbytes = int(dense.nbytes)
    density = float(np.count_nonzero(dense)) / max(1, dense.size)
    return name, fmt, "x".join(map(str, dense.shape)), density, nbytes, dbytes


def summary_table(exported: Exported) -> str:
    """Plain-text table: leaf, format, shape, density (non-zero fraction), bytes, ratio."""
    rows = [_row(k, v) for k, v in exported.items()]
    width = max([len("leaf")] + [len(r[0]) for r in rows])
    lines = [
        f"{'leaf':<{width}}  {'format':<12} {'shape':<14} {'density':>8} "
        f"{'bytes':>12} {'dense':>12} {'ratio':>6}"
    ]
    for name, fmt, shape, dens, nb, db in rows:
        lines.append(
            f"{name:<{width}}  {fmt:<12} {shape:<14} {dens:>8.3f} {nb:>12d} "
            f"{db:>12d} {nb / max(db, 1):>6.3f}"
        )
    tot, totd = sum(r[4] for r in rows), sum(r[5] for r in rows)
    lines.append(
        f"{'TOTAL':<{width}}  {'':<12} {'':<14} {'':>8} {tot:>12d} {totd:>12d} "
        f"{tot / max(totd, 1):>6.3f}"
    )
    return "\n".join(lines)


def main(params: Any, fmt: str, out_dir: str | Path, **opts: Any) -> Path:
    """Export ``params`` (``opts`` forwarded to :func:`export_params`), save
    ``out_dir/export_{fmt}.npz`` and ``export_{fmt}_summary.txt``, print the summary."""
    exported = export_params(params, fmt, **opts)
    out_dir = Path(out_dir)
    path = save_export(out_dir / f"export_{fmt}.npz", exported)
    table = summary_table(exported)
    (out_dir / f"export_{fmt}_summary.txt").write_text(table + "\n")
    print(table)
    print(f"wrote {path}")
    return path
