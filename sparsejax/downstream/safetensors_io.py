"""The safetensors file format with numpy only (no dependency).

Layout (https://github.com/huggingface/safetensors, "Format"): an unsigned little-endian
64-bit integer ``N``, then ``N`` bytes of UTF-8 JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the byte buffer that
follows; tensors stored C-contiguous, little-endian, back to back) plus an optional
``"__metadata__"`` map of strings to strings; the header may be padded with spaces. Here the
header is padded to a multiple of 8 bytes so every tensor starts 8-byte aligned.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sparsejax.downstream.validate import fail, little_endian

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": jnp.dtype(jnp.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {str(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the reference implementation's limit


def _dtype_name(a: np.ndarray) -> str:
    key = str(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
    if key not in _NAMES:
        raise ValueError(f"safetensors: dtype {a.dtype} has no safetensors name "
                         f"(supported: {sorted(_NAMES)})")
    return _NAMES[key]


def write(path: str | Path, tensors: dict[str, np.ndarray],
          metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (and string ``metadata``) to ``path`` in safetensors format."""
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors: metadata must map str to str, not {bad}")
        header["__metadata__"] = dict(metadata)
    arrays, offset = [], 0
    for name, arr in tensors.items():
        if name == "__metadata__":
            raise ValueError("safetensors: '__metadata__' is reserved, not a tensor name")
        a = little_endian(np.asarray(arr))
        dtype = _dtype_name(a)
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for a in arrays:
            f.write(a.tobytes())
    return path


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


class _Duplicate(Exception):
    pass


def _ints(path, field: str, value: Any, length: int | None = None) -> list[int]:
    if (not isinstance(value, list) or (length is not None and len(value) != length)
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)):
        size = "" if length is None else f"{length} "
        raise fail(path, field, f"must be a list of {size}ints >= 0, got {value!r:.80}")
    return value


def parse_header(path: str | Path, raw: bytes) -> tuple[dict[str, Any], dict[str, str], int]:
    """``(tensor entries, metadata, data start)`` of a safetensors file's bytes, every field
    checked: :class:`~sparsejax.downstream.validate.ExportFileError` naming the file and the
    field otherwise (header length, UTF-8, JSON object, duplicate names, ``__metadata__`` of
    strings, each tensor's ``dtype``/``shape``/``data_offsets``, and byte ranges that tile the
    data exactly: no overlap, no gap, nothing outside)."""
    if len(raw) < 8:
        raise fail(path, "header length", f"the file is {len(raw)} bytes, too short for a "
                   "safetensors file (8-byte header length first)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n == 0 or n > MAX_HEADER or 8 + n > len(raw):
        raise fail(path, "header length", f"{n} does not fit the file ({len(raw)} bytes; "
                   f"at most {MAX_HEADER})")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=_pairs)
    except UnicodeDecodeError as err:
        raise fail(path, "header", f"not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise fail(path, "header", f"not JSON ({err})") from None
    except _Duplicate as dup:
        raise fail(path, "header", f"name {dup.args[0]!r} appears twice") from None
    if not isinstance(header, dict):
        raise fail(path, "header", f"a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail(path, "__metadata__", "must map strings to strings")
    size = len(raw) - 8 - n
    spans = []
    for name, info in header.items():
        field = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise fail(path, field, f"entry is a JSON {type(info).__name__}, not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise fail(path, field, f"missing {missing}")
        if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
            raise fail(path, f"{field} dtype", f"unknown dtype {info['dtype']!r} (one of "
                       f"{sorted(DTYPES)})")
        shape = _ints(path, f"{field} shape", info["shape"])
        begin, end = _ints(path, f"{field} data_offsets", info["data_offsets"], 2)
        nbytes = math.prod(shape) * DTYPES[info["dtype"]].itemsize
        if end < begin or end > size or end - begin != nbytes:
            raise fail(path, f"{field} data_offsets", f"[{begin}, {end}] does not hold "
                       f"{shape} {info['dtype']} ({nbytes} bytes) inside the {size} data bytes")
        spans.append((begin, end, name))
    at, last = 0, None
    for begin, end, name in sorted(spans):
        if begin != at:
            what = "overlaps" if begin < at else "leaves a gap after"
            raise fail(path, f"tensor {name!r} data_offsets", f"[{begin}, {end}] {what} "
                       f"{'the start' if last is None else repr(last)} (byte {at})")
        at, last = end, name
    if at != size:
        raise fail(path, "data_offsets", f"the tensors cover {at} of the {size} data bytes")
    return header, metadata, 8 + n


def read(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; every header field is checked first
    (:func:`parse_header`)."""
    raw = Path(path).read_bytes()
    header, metadata, start = parse_header(path, raw)
    data = memoryview(raw)[start:]
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"]).copy()
    return tensors, metadata
