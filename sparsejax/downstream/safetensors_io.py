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
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sparsejax import errors

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
        a = np.ascontiguousarray(np.asarray(arr))
        dtype = _dtype_name(a)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
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


def read(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; :class:`~sparsejax.errors.InputError` (a
    ``ValueError``) naming the file if it is malformed."""
    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise errors.InputError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER or 8 + n > len(raw):
        raise errors.InputError(f"{path}: header length {n} does not fit the file "
                                f"({len(raw)} bytes)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise errors.InputError(f"{path}: the safetensors header is not JSON ({err})") from None
    data = memoryview(raw)[8 + n:]
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise errors.InputError(f"{path}: tensor {name!r} has unknown dtype "
                                    f"{info['dtype']!r}")
        dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= len(data) or end - begin != count * dtype.itemsize:
            raise errors.InputError(f"{path}: tensor {name!r} has byte range {begin}:{end}, "
                                    f"which does not hold {shape} {info['dtype']} inside the "
                                    "data")
        tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).copy()
    return tensors, metadata
