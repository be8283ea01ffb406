"""Export a run's model with its sparse structure, only when that saves space, and load it back.

Layouts (``pallas_kernels``' formats, which never import ``sparsejax``): **BSR** keeps the
non-zero ``(bk, bn)`` blocks of each prunable 2-D kernel plus their block indices (Gray et al.
2017); **N:M** keeps the ``n`` values of every ``m`` consecutive entries along the
contraction axis plus their packed in-group positions (Mishra et al. 2021). Which leaves are
prunable is :mod:`sparsejax.prunable`'s rule; the others (embeddings, norms, biases) are
stored dense.

Containers: ``.npz`` (numpy; a JSON ``__meta__`` entry as UTF-8 bytes; bfloat16 bit-exact
as uint16) and
``.safetensors`` (8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw bytes; written and read here with numpy). Both
carry the same metadata: the model's :class:`~sparsejax.models.gpt.GPTConfig` and the
sparse layout of every leaf, so :func:`load_export` rebuilds a runnable model.

Export never changes the weights: a kernel that is not ``n:m`` sparse is refused, never
re-pruned, and an export whose structure saves less than :data:`MIN_SAVING` of the dense
size is refused with the reason and the fix (:class:`ExportRefused`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.block_sparse.format import BSRLayout, BSRMatrix
from pallas_kernels.layers import BSRLinear, NMLinear
from pallas_kernels.nm.format import NMMatrix
from sparsejax import errors
from sparsejax.downstream import hf, loading, safetensors_io, validate
from sparsejax.models import sparse_ift
from sparsejax.models.gpt import GPT, GPTConfig
from sparsejax.models.layers import LinearFactory, dense_linear
from sparsejax.paths import path_str
from sparsejax.prunable import Predicate, resolve
from sparsejax.run import configlib
from sparsejax.run.rundir import RunDir

Exported = dict[str, Any]  # {leaf path: BSRMatrix | NMMatrix | np.ndarray}
FORMATS = ("bsr", "nm", "safetensors", "npz", "hf")
LAYOUTS = ("bsr", "nm")
DENSE = "dense"  # plain dense tensors (masks applied), for any run
CONTAINER_LAYOUTS = ("auto", *LAYOUTS, DENSE)  # --layout of safetensors / npz
MIN_SAVING = 0.10  # refuse an export that saves less than this fraction of the dense bytes
FORMAT_VERSION = "sparsejax-export/2"  # /2: a SHA-256 per tensor
FORMAT_UNCHECKED = "sparsejax-export/1"  # read with a warning: no checksums
FIX = ("to export compactly, train with block masks (sparsity.method=block, or "
       "model.linear=bsr; model.block=B) and export --format bsr, or with N:M sparsity "
       "(sparsity.method=nm, or ste/sr_ste, sparsity.n/m) and export --format nm")


class ExportRefused(errors.InputError):
    """The export would not save space, or the weights lack the structure asked for (exit
    status 2: the user's choice of format or layout)."""


def _to_bsr(name: str, leaf: np.ndarray, block: tuple[int, int]):
    bk, bn = block
    if leaf.shape[0] % bk or leaf.shape[1] % bn:
        return leaf, f"kept dense: shape {leaf.shape} not divisible by block {block}"
    return BSRMatrix.from_dense(leaf, block=block), ""


def _to_nm(name: str, leaf: np.ndarray, n: int, m: int):
    if leaf.shape[0] % m:
        raise ExportRefused(f"leaf {name!r}: K = {leaf.shape[0]} is not divisible by m = {m}")
    grouped = leaf.reshape(leaf.shape[0] // m, m, leaf.shape[1])
    worst = int((grouped != 0).sum(axis=1).max(initial=0))
    if worst > n:
        raise ExportRefused(
            f"leaf {name!r} is not {n}:{m} sparse along its input axis (a group of {m} holds "
            f"{worst} non-zeros) and export never re-prunes weights; it must be pruned {n}:{m} "
            f"in training (N:M: sparsity.method=nm, or ste/sr_ste, with sparsity.n={n}, "
            f"sparsity.m={m})")
    return NMMatrix.from_dense(leaf, n, m)


def export_params(
    params: Any,
    fmt: str,
    *,
    block: tuple[int, int] = (128, 128),
    n: int = 2,
    m: int = 4,
    prunable: Predicate | None = None,
) -> Exported:
    """``{path_str: BSRMatrix | NMMatrix | np.ndarray}`` for every leaf of ``params``.

    Prunable 2-D leaves (``sparsejax.prunable`` predicate; default: ndim >= 2 and no
    embed/norm/bias/pos in the path) become layout ``fmt`` (``"bsr"`` or ``"nm"``);
    everything else (and BSR leaves whose shape the block does not divide, with a warning)
    stays a dense numpy array. The values are never changed: ``"nm"`` raises
    :class:`ExportRefused` naming a leaf that is not ``n:m`` sparse.
    """
    if fmt not in LAYOUTS:
        raise errors.InputError(f"fmt must be one of {LAYOUTS}, got {fmt!r}")
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
            out[name] = _to_nm(name, arr, n, m)
    return out


def dense_export(params: Any) -> Exported:
    """``{path_str: dense numpy array}`` for every leaf of ``params``: the weights as the model
    computes with them (masks applied), in any layout-free container."""
    return {path_str(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _nbytes(obj) -> tuple[int, int]:
    if isinstance(obj, BSRMatrix | NMMatrix):
        return obj.nbytes(), obj.dense_nbytes()
    return int(np.asarray(obj).nbytes), int(np.asarray(obj).nbytes)


def sizes(exported: Exported) -> tuple[int, int]:
    """``(bytes, dense bytes)`` of a whole export: packed values plus index tables."""
    pairs = [_nbytes(v) for v in exported.values()]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


# ---- containers -------------------------------------------------------------------------


def _store(arr) -> tuple[np.ndarray, str]:
    a = np.asarray(arr)
    name = str(a.dtype)
    if a.dtype.kind == "V" or name == "bfloat16":
        a = a.view(f"uint{8 * a.dtype.itemsize}")
    return a, name


def _restore(path: Path, key: str, a: np.ndarray, dtype: Any) -> np.ndarray:
    """The npz array ``a`` as ``dtype`` (bfloat16 is stored as its uint16 bits)."""
    try:
        want = jnp.dtype(dtype)
    except TypeError:
        raise validate.fail(path, f"dtypes[{key!r}]", f"unknown dtype {dtype!r}") from None
    if a.dtype == want:
        return a
    if a.dtype.kind != "u" or a.dtype.itemsize != want.itemsize:
        raise validate.fail(path, f"dtypes[{key!r}]", f"{dtype!r} does not match the stored "
                            f"{a.dtype}")
    return a.view(want)


def _tensors(exported: Exported) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Flat named arrays plus each leaf's layout (which tensors hold it)."""
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, Any] = {}
    for name, obj in exported.items():
        key = name.replace("/", ".")
        if isinstance(obj, BSRMatrix):
            tensors[key + ".values"] = np.asarray(obj.values)
            tensors[key + ".rows"] = np.asarray(obj.layout.rows, np.int32)
            tensors[key + ".cols"] = np.asarray(obj.layout.cols, np.int32)
            layout[name] = dict(kind="bsr", shape=list(obj.shape), block=list(obj.block),
                                values=key + ".values", rows=key + ".rows", cols=key + ".cols")
        elif isinstance(obj, NMMatrix):
            tensors[key + ".values"] = np.asarray(obj.values)
            tensors[key + ".codes"] = np.asarray(obj.codes)
            layout[name] = dict(kind="nm", shape=list(obj.shape), n=obj.n, m=obj.m,
                                values=key + ".values", codes=key + ".codes")
        else:
            tensors[key] = np.asarray(obj)
            layout[name] = dict(kind="dense", values=key)
    return tensors, layout


def _from_tensors(tensors: dict[str, np.ndarray], layout: dict[str, Any]) -> Exported:
    out: Exported = {}
    for name, info in layout.items():
        values = tensors[info["values"]]
        if info["kind"] == "bsr":
            lay = BSRLayout(tuple(info["shape"]), tuple(info["block"]),
                            np.asarray(tensors[info["rows"]]), np.asarray(tensors[info["cols"]]))
            out[name] = BSRMatrix(jnp.asarray(values), lay)
        elif info["kind"] == "nm":
            out[name] = NMMatrix(jnp.asarray(values), jnp.asarray(tensors[info["codes"]]),
                                 tuple(info["shape"]), info["n"], info["m"])
        else:
            out[name] = values
    return out


def save_export(path: str | Path, exported: Exported, meta: dict[str, Any] | None = None
                ) -> Path:
    """Write ``exported`` (and ``meta``, e.g. the model config) to ``path``: a
    ``.safetensors`` file when it ends so, else one ``.npz`` (suffix added); returns it."""
    tensors, layout = _tensors(exported)
    header = {"format": FORMAT_VERSION, "layout": layout, **(meta or {}),
              "sha256": {k: validate.tensor_sha256(v) for k, v in tensors.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors_io.write(path, tensors, {"sparsejax": json.dumps(header)})
        return path
    path = path.with_suffix(".npz")
    arrays, dtypes = {}, {}
    for key, arr in tensors.items():
        arrays[key], dtypes[key] = _store(arr)
    header["dtypes"] = dtypes
    np.savez(path, __meta__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    return path


def _json_object(path: Path, field: str, text: bytes | str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise validate.fail(path, field, f"not JSON ({err})") from None
    if not isinstance(obj, dict):
        raise validate.fail(path, field, f"a JSON {type(obj).__name__}, not an object")
    return obj


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "__meta__" not in data:
                raise errors.InputError(f"{path}: not a sparsejax export (no __meta__ entry)")
            meta = data["__meta__"]
            if meta.dtype != np.uint8 or meta.ndim != 1:
                raise validate.fail(path, "__meta__", f"must be 1-D uint8 JSON, got "
                                    f"{meta.dtype}{meta.shape}")
            header = _json_object(path, "__meta__", meta.tobytes())
            dtypes = header.get("dtypes")
            if not isinstance(dtypes, dict):
                raise validate.fail(path, "dtypes", "missing or not an object")
            extra = sorted(set(data.files) - set(dtypes) - {"__meta__"})
            if extra:
                raise validate.fail(path, "dtypes", f"arrays {extra} are not listed")
            tensors = {}
            for key, dtype in dtypes.items():
                if key not in data.files:
                    raise validate.fail(path, f"dtypes[{key!r}]", "names an array the file "
                                        "does not hold")
                tensors[key] = _restore(path, key, data[key], dtype)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, errors.InputError):
            raise
        raise validate.fail(path, "npz", f"not a readable npz file ({type(err).__name__}: "
                            f"{str(err)[:200]})") from None
    return tensors, header


def read_export(path: str | Path) -> tuple[Exported, dict[str, Any]]:
    """``(exported, meta)`` of a file written by :func:`save_export` (npz or safetensors),
    checked before use (:mod:`~sparsejax.downstream.validate`): the container's fields, each
    tensor's SHA-256 recorded at export, and the layout of every leaf (BSR block indices in
    range, sorted and unique; N:M codes valid; shapes and dtypes). Raises
    :class:`~sparsejax.downstream.validate.ExportFileError` (an
    :class:`~sparsejax.errors.InputError`) naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise errors.MissingInputError(f"export file {path} does not exist")
    if path.suffix == ".safetensors":
        tensors, meta = safetensors_io.read(path)
        if "sparsejax" not in meta:
            raise errors.InputError(f"{path}: a safetensors file without sparsejax metadata")
        header = _json_object(path, "__metadata__.sparsejax", meta["sparsejax"])
    else:
        tensors, header = _read_npz(path)
    if header.get("format") not in (FORMAT_VERSION, FORMAT_UNCHECKED):
        raise validate.fail(path, "format", f"{header.get('format')!r}, expected "
                            f"{FORMAT_VERSION!r}")
    if header["format"] == FORMAT_UNCHECKED:
        warnings.warn(f"{path}: written before exports carried checksums "
                      f"({FORMAT_UNCHECKED}); its data is not verified", stacklevel=2)
    else:
        validate.check_checksums(path, tensors, header.get("sha256"))
    validate.check_layout(path, header.get("layout"), tensors)
    return _from_tensors(tensors, header["layout"]), header


# ---- models -----------------------------------------------------------------------------


def dense_params(model: GPT) -> dict[str, Any]:
    """The model's params as a dense GPT holds them (``kernel``/``bias`` per linear layer):
    BSR / N:M layers are decompressed, so every model exports the same way."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for path, node in nnx.iter_graph(model):
        if isinstance(node, BSRLinear | NMLinear):
            entry = params
            for k in path:
                entry = entry[k]
            entry.pop("values")
            entry["kernel"] = np.asarray(node.sparse_kernel().to_dense())
    return params


class ExportResult(NamedTuple):
    """What :func:`export_run` wrote."""

    path: Path
    layout: str  # "bsr", "nm" or "dense"
    nbytes: int
    dense_nbytes: int
    table: str  # per-leaf summary (:func:`summary_table`)

    @property
    def ratio(self) -> float:
        return self.nbytes / self.dense_nbytes


def _try_layout(params, layout: str, block, n: int, m: int) -> tuple[Exported | None, str]:
    """The export in ``layout`` if it saves at least MIN_SAVING, else ``(None, reason)``."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exported = export_params(params, layout, block=block, n=n, m=m)
    except ExportRefused as e:
        return None, str(e)
    nbytes, dense = sizes(exported)
    if nbytes > (1.0 - MIN_SAVING) * dense:
        what = f"BSR with {block[0]}x{block[1]} blocks" if layout == "bsr" else f"N:M {n}:{m}"
        why = ""
        if layout == "bsr":
            mats = [v for v in exported.values() if isinstance(v, BSRMatrix)]
            kept = sum(v.layout.nnz for v in mats)
            total = sum(v.layout.grid[0] * v.layout.grid[1] for v in mats)
            why = f": {kept} of {total} blocks of the prunable kernels hold a non-zero"
            if caught:
                why += f" ({len(caught)} kernels kept dense, not divisible by the block)"
        return None, (f"{what} would be {nbytes / dense:.3f}x the dense size (saves "
                      f"{100 * (1 - nbytes / dense):.1f}% < {100 * MIN_SAVING:.0f}%){why}")
    return exported, ""


def export_run(
    run_dir: str | Path,
    fmt: str,
    *,
    out: str | Path | None = None,
    layout: str = "auto",
    block: tuple[int, int] | None = None,
    n: int | None = None,
    m: int | None = None,
    step: int | None = None,
) -> ExportResult:
    """Export a run's model (:func:`sparsejax.load`) without changing a weight.

    ``fmt``: ``"bsr"`` / ``"nm"`` (that layout, ``.npz``), ``"safetensors"`` / ``"npz"``
    (that container, layout ``layout``: ``"bsr"``, ``"nm"``, ``"auto"`` (N:M when every
    prunable kernel is ``n:m`` sparse, else BSR) or ``"dense"``: plain dense tensors, masks
    applied, for any run, never refused). ``block`` defaults to the run's ``model.block``
    square, ``n``/``m`` to its ``sparsity.n/m``. Writes ``OUT/export_{fmt}.npz``,
    ``OUT/model.safetensors`` (dense: ``OUT/export_npz_dense.npz``,
    ``OUT/model_dense.safetensors``; ``OUT`` default ``RUN_DIR/export``) holding the model
    config, the run's ``config.json`` and a SHA-256 per tensor, plus a per-leaf summary.
    ``"hf"``: ``OUT/hf/config.json`` + ``OUT/hf/model.safetensors``, Hugging Face GPT-2
    (:mod:`~sparsejax.downstream.hf`; :class:`~sparsejax.downstream.hf.NotGPT2` for a model
    that is not GPT-2, e.g. rotary positions). Raises
    :class:`ExportRefused` with the reason and the fix when a BSR / N:M structure
    would save less than 10% of the dense size.
    """
    if fmt not in FORMATS:
        raise errors.InputError(f"format must be one of {FORMATS}, got {fmt!r}")
    implied = fmt if fmt in LAYOUTS else DENSE if fmt == "hf" else None
    if implied is not None:  # the format is the layout: another --layout contradicts it
        if layout not in ("auto", implied):
            raise errors.InputError(f"layout {layout!r} needs format 'safetensors' or 'npz' "
                                    f"(format {fmt!r} is the {implied!r} layout)")
        layout = implied
    if layout not in CONTAINER_LAYOUTS:
        raise errors.InputError(f"layout must be one of {CONTAINER_LAYOUTS}, got {layout!r}")
    loaded = loading.load(run_dir, step=step)
    config = loaded.config
    block = block or (config.model.block, config.model.block)
    n = n if n is not None else config.sparsity.n
    m = m if m is not None else config.sparsity.m
    params = dense_params(loaded.model)
    reasons = []
    exported = dense_export(params) if layout == DENSE else None
    candidates = () if layout == DENSE else ("nm", "bsr") if layout == "auto" else (layout,)
    for candidate in candidates:
        exported, reason = _try_layout(params, candidate, block, n, m)
        if exported is not None:
            layout = candidate
            break
        reasons.append(reason)
    if exported is None:
        raise ExportRefused(f"export of {run_dir} refused: " + "; ".join(reasons) + "; " + FIX
                            + "; or export plain dense tensors (--layout dense)")
    out = Path(out) if out is not None else RunDir(run_dir).export_dir
    if fmt == "hf":  # GPT-2 names and config.json, or NotGPT2 with the reason
        path = hf.write_gpt2(out / hf.HF_DIR, loaded.model.cfg, params)
        table = summary_table(exported)
        return ExportResult(path, layout, *sizes(exported), table)
    name = f"export_{fmt}" if layout != DENSE else f"export_{fmt}_dense"
    target = out / (f"{name}.npz" if fmt != "safetensors" else "model_dense.safetensors"
                    if layout == DENSE else "model.safetensors")
    meta = {"model": dataclasses.asdict(loaded.model.cfg),
            "source": {"run_dir": str(Path(run_dir).absolute()), "step": loaded.step}}
    run_config = RunDir(run_dir).read_config()
    if run_config is not None:
        meta["config"] = run_config
    path = save_export(target, exported, meta)
    table = summary_table(exported)
    (out / f"{name}_summary.txt").write_text(table + "\n")
    nbytes, dense = sizes(exported)
    return ExportResult(path, layout, nbytes, dense, table)


def _set_module(model: GPT, path: tuple[str, ...], layer: nnx.Module) -> None:
    parent: Any = model
    for k in path[:-1]:
        parent = parent[int(k)] if k.isdigit() else getattr(parent, k)
    setattr(parent, path[-1], layer)


def _linear(path: str | Path, meta: dict[str, Any]) -> LinearFactory:
    """The linear layers of the exported model: dense, or the Sparse-IFT family (Thangarasa et
    al. 2023) the run's stored config names (its layers hold several linears each)."""
    if meta.get("config") is None:
        return dense_linear
    spec = configlib.stored_spec(meta["config"], f"{path}: config")
    ift = spec.model.sparse_ift
    if ift.family in ("", "wide"):  # Wide: only the widths change, already in the model config
        return dense_linear
    return sparse_ift.factory(ift.family, ift.sparsity, base=dense_linear,
                              rank_multiple=spec.model.block if spec.model.linear == "bsr" else 1)


def load_export(path: str | Path, *, kernels: bool = True) -> GPT:
    """A runnable GPT from an export file (npz or safetensors) written by :func:`export_run`.

    ``kernels=True``: prunable kernels run on the sparse layers (``BSRLinear``/``NMLinear``:
    only the stored blocks / N:M values are multiplied); ``kernels=False``: they are
    decompressed into dense ``nnx.Linear`` kernels, whose logits equal the exported model's
    bit for bit (a dense-layout export has only dense layers). The file is checked first
    (:func:`read_export`: checksums, layouts, shapes, dtypes); raises
    :class:`~sparsejax.errors.InputError` naming the file and the field that is wrong, or a
    leaf the model has and the file lacks."""
    exported, meta = read_export(path)
    if "model" not in meta:
        raise errors.InputError(f"{path}: the export holds no model config (written by "
                                "export_params without meta?)")
    if not isinstance(meta["model"], dict):
        raise validate.fail(path, "model", f"must be an object, got {meta['model']!r:.80}")
    try:
        cfg = GPTConfig(**meta["model"])
    except (TypeError, ValueError) as e:
        raise validate.fail(path, "model", f"not a valid GPTConfig ({e})") from None
    linear = _linear(path, meta)
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0), linear=linear))  # all replaced
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    names = [path_str(p) for p, _ in leaves]
    missing = [nm for nm in names if nm not in exported]
    extra = sorted(set(exported) - set(names))
    if missing or extra:
        raise errors.InputError(f"{path}: the export does not match its model config: "
                                f"missing {missing}, extra {extra}")
    dense = [jnp.asarray(exported[nm].to_dense() if isinstance(exported[nm], BSRMatrix | NMMatrix)
                         else exported[nm]) for nm in names]
    for nm, ref, arr in zip(names, (leaf for _, leaf in leaves), dense, strict=True):
        if arr.shape != tuple(ref.shape) or arr.dtype != ref.dtype:
            raise validate.fail(path, f"leaf {nm}", f"{arr.dtype}{arr.shape}, the model "
                                f"holds {ref.dtype}{tuple(ref.shape)}")
    nnx.replace_by_pure_dict(state, treedef.unflatten(dense))
    model = nnx.merge(graphdef, state, rest)
    if kernels:
        for nm, obj in exported.items():
            if isinstance(obj, BSRMatrix | NMMatrix):
                parts = tuple(nm.split("/"))
                layer: Any = model
                for k in parts[:-2]:
                    layer = layer[int(k)] if k.isdigit() else getattr(layer, k)
                layer = getattr(layer, parts[-2])
                bias = layer.bias[...] if layer.bias is not None else None
                cls = BSRLinear if isinstance(obj, BSRMatrix) else NMLinear
                _set_module(model, parts[:-1], cls(obj, bias, dtype=cfg.dtype))  # compute dtype
    return model


def _row(name: str, obj) -> tuple[str, str, str, float, int, int]:
    if isinstance(obj, BSRMatrix):
        dense = np.asarray(obj.to_dense())
        fmt = f"bsr {obj.block[0]}x{obj.block[1]}"
    elif isinstance(obj, NMMatrix):
        dense = np.asarray(obj.to_dense())
        fmt = f"nm {obj.n}:{obj.m}"
    else:
        dense = np.asarray(obj)
        fmt = "dense"
    nbytes, dbytes = _nbytes(obj)
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
    tot, totd = sizes(exported)
    lines.append(
        f"{'TOTAL':<{width}}  {'':<12} {'':<14} {'':>8} {tot:>12d} {totd:>12d} "
        f"{tot / max(totd, 1):>6.3f}"
    )
    return "\n".join(lines)
