"""Adversarial export files: every malformed safetensors header, damaged npz, out-of-range /
duplicated / unsorted BSR block indices, corrupted N:M codes and a flipped bit in a tensor body
is refused with one :class:`~sparsejax.errors.InputError` naming the file and the field, never
loaded. The files are tiny and written by hand (headers as JSON text, bytes with ``struct``)."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from pallas_kernels import BSRMatrix, NMMatrix
from sparsejax import errors
from sparsejax.downstream import safetensors_io, validate
from sparsejax.downstream.export import FORMAT_UNCHECKED, read_export, save_export
from sparsejax.downstream.validate import ExportFileError, tensor_sha256

# ---- safetensors headers ----------------------------------------------------------------

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def container(header: bytes | object, data: bytes = b"\0" * 8, length: int | None = None
              ) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header, data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def two(a: dict, b: dict) -> dict:
    return {"a": a, "b": b}


HEADERS = {  # kind: (file bytes, field named, words in the message)
    "file shorter than 8 bytes": (b"\x10\0\0\0", "header length", "too short"),
    "header length 0": (container(b"", b""), "header length", "does not fit"),
    "header length larger than the file": (container({"a": F32x2}, length=10**6),
                                           "header length", "does not fit"),
    "header not UTF-8": (container(b'{"\xff": 1}'), "header", "not UTF-8"),
    "header not JSON": (container(b"{'a': 1}"), "header", "not JSON"),
    "header a list": (container([F32x2]), "header", "JSON list, not an object"),
    "header a string": (container("F32"), "header", "JSON str, not an object"),
    "header a number": (container(8), "header", "JSON int, not an object"),
    "duplicate tensor names": (container(b'{"a": ' + json.dumps(F32x2).encode() + b', "a": '
                                         + json.dumps(F32x2).encode() + b"}"),
                               "header", "'a' appears twice"),
    "metadata a list": (container({"__metadata__": ["x"], "a": F32x2}), "__metadata__",
                        "strings to strings"),
    "metadata non-string value": (container({"__metadata__": {"k": 1}, "a": F32x2}),
                                  "__metadata__", "strings to strings"),
    "tensor entry a list": (container({"a": [1, 2]}), "tensor 'a'", "not an object"),
    "missing dtype": (container({"a": {"shape": [2], "data_offsets": [0, 8]}}), "tensor 'a'",
                      "missing ['dtype']"),
    "missing data_offsets": (container({"a": {"dtype": "F32", "shape": [2]}}), "tensor 'a'",
                             "missing ['data_offsets']"),
    "unknown dtype": (container({"a": {**F32x2, "dtype": "F128"}}), "tensor 'a' dtype",
                      "unknown dtype 'F128'"),
    "dtype not a string": (container({"a": {**F32x2, "dtype": 4}}), "tensor 'a' dtype",
                           "unknown dtype 4"),
    "shape a string": (container({"a": {**F32x2, "shape": "2"}}), "tensor 'a' shape",
                       "list of ints >= 0"),
    "shape negative": (container({"a": {**F32x2, "shape": [-2]}}), "tensor 'a' shape",
                       "list of ints >= 0"),
    "shape of floats": (container({"a": {**F32x2, "shape": [2.0]}}), "tensor 'a' shape",
                        "list of ints >= 0"),
    "shape of bools": (container({"a": {**F32x2, "shape": [True, True]}}), "tensor 'a' shape",
                       "list of ints >= 0"),
    "offsets a string": (container({"a": {**F32x2, "data_offsets": "0:8"}}),
                         "tensor 'a' data_offsets", "list of 2 ints"),
    "offsets of one int": (container({"a": {**F32x2, "data_offsets": [8]}}),
                           "tensor 'a' data_offsets", "list of 2 ints"),
    "offsets negative": (container({"a": {**F32x2, "data_offsets": [-8, 0]}}),
                         "tensor 'a' data_offsets", "list of 2 ints"),
    "offsets reversed": (container({"a": {**F32x2, "data_offsets": [8, 0]}}),
                         "tensor 'a' data_offsets", "does not hold"),
    "offsets past the data": (container({"a": {**F32x2, "data_offsets": [8, 16]}}),
                              "tensor 'a' data_offsets", "inside the 8 data bytes"),
    "offsets not the shape's size": (container({"a": {**F32x2, "shape": [3]}}),
                                     "tensor 'a' data_offsets", "(12 bytes)"),
    "tensors overlapping": (container(two(F32x2, {**F32x2, "data_offsets": [4, 12]}),
                                      b"\0" * 16), "tensor 'b' data_offsets", "overlaps 'a'"),
    "gap between tensors": (container(two(F32x2, {**F32x2, "data_offsets": [12, 20]}),
                                      b"\0" * 20), "tensor 'b' data_offsets", "gap after 'a'"),
    "data not covered": (container({"a": F32x2}, b"\0" * 12), "data_offsets",
                         "cover 8 of the 12"),
    "first tensor not at 0": (container({"a": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12),
                              "tensor 'a' data_offsets", "gap after the start"),
}


@pytest.mark.parametrize("kind", list(HEADERS))
def test_malformed_safetensors_header_is_refused_naming_the_field(tmp_path, kind):
    raw, field, words = HEADERS[kind]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(ExportFileError) as e:
        safetensors_io.read(path)
    assert isinstance(e.value, errors.InputError)
    assert str(e.value).startswith(f"{path}: {field}: "), str(e.value)
    assert words in str(e.value), str(e.value)


def test_the_valid_forms_of_those_headers_read():
    """The same hand-written files, made valid, read back (the checks refuse only the defect):
    two tensors tiling 16 bytes, a string metadata map and a padded header."""
    data = struct.pack("<2f", 1.5, -2.0) + struct.pack("<2i", 7, -9)
    header = {"__metadata__": {"k": "v"}, "a": F32x2,
              "b": {"dtype": "I32", "shape": [2], "data_offsets": [8, 16]}}
    raw = container(json.dumps(header).encode() + b"   ", data)
    tensors, meta = safetensors_io.parse_header("x", raw)[:2]
    assert meta == {"k": "v"} and set(tensors) == {"a", "b"}


# ---- sparsejax exports ------------------------------------------------------------------


def hand_export() -> dict:
    """One BSR, two N:M and one dense leaf, values and layouts set by hand."""
    w = np.zeros((4, 6), np.float32)  # 2x2 blocks, grid 2x3; blocks (1, 0), (0, 2), (1, 2)
    w[2:4, 0:2], w[0:2, 4:6], w[2:4, 4:6] = 1.0, 2.0, 3.0
    w24 = np.array([[1, 0, 0], [0, 2, 0], [3, 0, 4], [0, 5, 6]], np.float32)  # 2:4, 1 group
    w13 = np.array([[0, 7], [8, 0], [0, 0]], np.float32)  # 1:3 along K
    bsr = BSRMatrix.from_dense(w, block=(2, 2))
    assert bsr.layout.rows.tolist() == [1, 0, 1] and bsr.layout.cols.tolist() == [0, 2, 2]
    return {"fc/kernel": bsr, "nm/kernel": NMMatrix.from_dense(w24, 2, 4),
            "nm13/kernel": NMMatrix.from_dense(w13, 1, 3),
            "fc/bias": np.arange(6, dtype=np.float32)}


def rewrite(path: Path, edit, *, checksums: bool = True) -> None:
    """Apply ``edit(tensors, header)`` to a safetensors export and write it back, with its
    checksums recomputed (so a structural check, not the checksum, must catch the edit)."""
    tensors, meta = safetensors_io.read(path)
    header = json.loads(meta["sparsejax"])
    edit(tensors, header)
    if checksums:
        header["sha256"] = {k: tensor_sha256(v) for k, v in tensors.items()}
    safetensors_io.write(path, tensors, {"sparsejax": json.dumps(header)})


def _set(key, value):
    def edit(tensors, header):
        tensors[key] = value if isinstance(value, np.ndarray) else np.asarray(
            value, tensors[key].dtype)
    return edit


def _layout(leaf, **fields):
    def edit(tensors, header):
        header["layout"][leaf].update(fields)
    return edit


def _header(**fields):
    def edit(tensors, header):
        header.update(fields)
    return edit


def _drop(leaf, key):
    def edit(tensors, header):
        del header["layout"][leaf][key]
    return edit


def _add_tensor(tensors, header):
    tensors["stray"] = np.zeros(2, np.float32)


def _share_tensor(tensors, header):
    header["layout"]["fc/bias"]["values"] = "nm.kernel.values"
    del tensors["fc.bias"]


EXPORTS = {  # kind: (edit, field named, words in the message)
    "bsr rows out of range": (_set("fc.kernel.rows", [1, 0, 2]), "tensor 'fc.kernel.rows'",
                              "block index 2 at position 2 is out of range [0, 2)"),
    "bsr cols out of range": (_set("fc.kernel.cols", [0, 2, 3]), "tensor 'fc.kernel.cols'",
                              "block index 3 at position 2 is out of range [0, 3)"),
    "bsr cols negative": (_set("fc.kernel.cols", [-1, 2, 2]), "tensor 'fc.kernel.cols'",
                          "block index -1 at position 0"),
    "bsr block duplicated": (_set("fc.kernel.rows", [1, 1, 1]), "layout['fc/kernel'].rows/cols",
                             "block (1, 2) is stored twice"),
    "bsr blocks unsorted": (_set("fc.kernel.rows", [1, 1, 0]), "layout['fc/kernel'].rows/cols",
                            "not in CSC order"),
    "bsr rows float": (_set("fc.kernel.rows", np.array([1.0, 0.0, 1.0], np.float32)),
                       "tensor 'fc.kernel.rows'", "dtype float32 is not integer"),
    "bsr rows 2-D": (_set("fc.kernel.rows", np.array([[1, 0, 1]], np.int32)),
                     "tensor 'fc.kernel.rows'", "1-D of one length"),
    "bsr rows and cols lengths differ": (_set("fc.kernel.rows", np.array([1, 0], np.int32)),
                                         "tensor 'fc.kernel.cols'", "1-D of one length"),
    "bsr values count differs": (_set("fc.kernel.values", np.ones((2, 2, 2), np.float32)),
                                 "tensor 'fc.kernel.values'", "expected (3, 2, 2)"),
    "bsr block not dividing": (_layout("fc/kernel", block=[3, 2]), "layout['fc/kernel'].block",
                               "does not divide shape (4, 6)"),
    "bsr shape wrong type": (_layout("fc/kernel", shape="4x6"), "layout['fc/kernel'].shape",
                             "list of two ints"),
    "nm n > m": (_layout("nm/kernel", n=5), "layout['nm/kernel'].n", "1 <= n <= m = 4"),
    "nm n = 0": (_layout("nm/kernel", n=0), "layout['nm/kernel'].n", "1 <= n <= m = 4"),
    "nm m = 0": (_layout("nm/kernel", m=0), "layout['nm/kernel'].m", "int >= 2, got 0"),
    "nm m not dividing K": (_layout("nm/kernel", m=3, n=2), "layout['nm/kernel'].m",
                            "does not divide K = 4"),
    "nm codes repeated position": (_set("nm.kernel.codes", [[0b0101, 0b1001, 0b1110]]),
                                   "tensor 'nm.kernel.codes'", "group 0 of column 0 holds "
                                   "positions [1, 1]"),
    "nm codes decreasing": (_set("nm.kernel.codes", [[0b0010, 0b1101, 0b1110]]),
                            "tensor 'nm.kernel.codes'", "positions [2, 0]"),
    "nm code position >= m": (_set("nm13.kernel.codes", [[0b01, 0b11]]),
                              "tensor 'nm13.kernel.codes'", "positions [3], not 1 distinct"),
    "nm codes unused bits set": (_set("nm.kernel.codes", [[0b10001000, 0b1101, 0b1110]]),
                                 "tensor 'nm.kernel.codes'", "bits set outside"),
    "nm codes wrong dtype": (_set("nm.kernel.codes", np.array([[8, 13, 14]], np.uint16)),
                             "tensor 'nm.kernel.codes'", "dtype uint16, 2:4 codes of 1 groups "
                             "are uint8"),
    "nm codes wrong shape": (_set("nm.kernel.codes", np.array([[8, 13]], np.uint8)),
                             "tensor 'nm.kernel.codes'", "expected (1, 3)"),
    "nm values wrong shape": (_set("nm.kernel.values", np.ones((2, 2), np.float32)),
                              "tensor 'nm.kernel.values'", "expected (2, 3)"),
    "dense leaf integer": (_set("fc.bias", np.arange(6, dtype=np.int32)),
                           "tensor 'fc.bias'", "dtype int32 is not floating"),
    "unknown layout": (_layout("fc/kernel", kind="csr"), "layout['fc/kernel'].kind",
                       "unknown layout 'csr'"),
    "layout key missing": (_drop("fc/kernel", "rows"), "layout['fc/kernel']",
                           "missing key 'rows'"),
    "layout names an absent tensor": (_layout("fc/bias", values="nope"),
                                      "layout['fc/bias'].values", "tensor 'nope'"),
    "tensor shared by two leaves": (_share_tensor, "layout['fc/bias'].values",
                                    "already layout['nm/kernel'].values"),
    "stray tensor": (_add_tensor, "layout", "['stray'] belong to no leaf"),
    "layout not an object": (_header(layout=["fc/kernel"]), "layout", "non-empty object"),
    "format unknown": (_header(format="sparsejax-export/9"), "format", "expected"),
}


@pytest.fixture
def export_file(tmp_path) -> Path:
    return save_export(tmp_path / "e.safetensors", hand_export(), {"model": {}})


def test_hand_export_round_trips(export_file):
    """The fixture file is valid: every leaf reads back equal to the hand-set weights."""
    exported, meta = read_export(export_file)
    for name, want in hand_export().items():
        got = exported[name]
        dense = (lambda x: np.asarray(x.to_dense()) if hasattr(x, "to_dense") else x)
        np.testing.assert_array_equal(dense(got), dense(want))
    assert set(meta["sha256"]) == set(safetensors_io.read(export_file)[0])


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_malformed_export_is_refused_naming_the_field(export_file, kind):
    edit, field, words = EXPORTS[kind]
    rewrite(export_file, edit)
    with pytest.raises(ExportFileError) as e:
        read_export(export_file)
    assert str(e.value).startswith(f"{export_file}: {field}: "), str(e.value)
    assert words in str(e.value), str(e.value)


def _flip_body_bit(path: Path, tensor: str) -> None:
    raw = bytearray(path.read_bytes())
    header, _, start = safetensors_io.parse_header(path, bytes(raw))
    begin = header[tensor]["data_offsets"][0]
    raw[start + begin] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("tensor", ["fc.kernel.values", "fc.kernel.rows", "nm.kernel.codes"])
def test_a_flipped_bit_in_a_tensor_body_is_refused(export_file, tensor):
    _flip_body_bit(export_file, tensor)
    with pytest.raises(ExportFileError, match=f"{export_file}: tensor '{tensor}': does not "
                       "match the SHA-256 recorded at export"):
        read_export(export_file)


@pytest.mark.parametrize("sha256, words", [
    ("abc", "must map each tensor name"),
    ({"fc.bias": "0" * 64}, "no checksum for ['fc.kernel.cols'"),
    (None, "must map each tensor name"),
])
def test_missing_or_malformed_checksums_are_refused(export_file, sha256, words):
    rewrite(export_file, _header(sha256=sha256), checksums=False)
    with pytest.raises(ExportFileError, match=f"{export_file}: sha256: ") as e:
        read_export(export_file)
    assert words in str(e.value)


def test_an_export_written_before_checksums_loads_with_a_warning(export_file):
    def old(tensors, header):
        header["format"] = FORMAT_UNCHECKED
        del header["sha256"]
    rewrite(export_file, old, checksums=False)
    with pytest.warns(UserWarning, match="not verified"):
        exported, _ = read_export(export_file)
    assert set(exported) == set(hand_export())


@pytest.mark.parametrize("metadata, field", [
    ({}, "sparsejax metadata"),
    ({"sparsejax": "{not json"}, "__metadata__.sparsejax: not JSON"),
    ({"sparsejax": "[1, 2]"}, "__metadata__.sparsejax: a JSON list"),
])
def test_missing_or_malformed_sparsejax_metadata(tmp_path, metadata, field):
    path = safetensors_io.write(tmp_path / "x.safetensors", {"a": np.zeros(2, np.float32)},
                                metadata)
    with pytest.raises(errors.InputError, match=field):
        read_export(path)


# ---- npz exports ------------------------------------------------------------------------


@pytest.fixture
def npz_file(tmp_path) -> Path:
    return save_export(tmp_path / "e.npz", hand_export(), {"model": {}})


def _npz_rewrite(path: Path, edit) -> None:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    edit(arrays)
    np.savez(path, **arrays)


def _meta(edit):
    def apply(arrays):
        header = json.loads(arrays["__meta__"].tobytes())
        edit(header)
        arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    return apply


NPZ = {
    "not a zip": (lambda p: p.write_bytes(b"PK\x03\x04 garbage"), "npz: not a readable npz"),
    "meta not JSON": (lambda p: _npz_rewrite(p, lambda a: a.update(
        __meta__=np.frombuffer(b"{oops", np.uint8))), "__meta__: not JSON"),
    "meta not bytes": (lambda p: _npz_rewrite(p, lambda a: a.update(
        __meta__=np.zeros(3, np.float32))), "__meta__: must be 1-D uint8"),
    "unknown dtype": (lambda p: _npz_rewrite(p, _meta(
        lambda h: h["dtypes"].update({"fc.bias": "float99"}))), "dtypes['fc.bias']: unknown"),
    "dtype not the stored one": (lambda p: _npz_rewrite(p, _meta(
        lambda h: h["dtypes"].update({"fc.bias": "float16"}))), "dtypes['fc.bias']: 'float16' "
        "does not match the stored float32"),
    "array not listed": (lambda p: _npz_rewrite(p, lambda a: a.update(extra=np.zeros(1))),
                         "dtypes: arrays ['extra'] are not listed"),
    "bit flip": (lambda p: _npz_rewrite(p, lambda a: a.update(
        {"fc.kernel.values": a["fc.kernel.values"] + np.float32(2.0**-20)})),
        "tensor 'fc.kernel.values': does not match the SHA-256"),
    "cols edited": (lambda p: _npz_rewrite(p, lambda a: a.update(
        {"fc.kernel.cols": np.array([0, 2, 5], np.int32)})), "tensor 'fc.kernel.cols'"),
}


@pytest.mark.parametrize("kind", list(NPZ))
def test_damaged_npz_export_is_refused(npz_file, kind):
    damage, words = NPZ[kind]
    damage(npz_file)
    with pytest.raises(ExportFileError) as e:
        read_export(npz_file)
    assert str(e.value).startswith(f"{npz_file}: "), str(e.value)
    assert words in str(e.value), str(e.value)


def test_npz_round_trip_verifies_checksums(npz_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported, meta = read_export(npz_file)
    assert meta["format"] == "sparsejax-export/2"
    np.testing.assert_array_equal(np.asarray(exported["nm13/kernel"].to_dense()),
                                  np.asarray(hand_export()["nm13/kernel"].to_dense()))


def test_validation_decodes_nm_codes_like_the_kernels():
    """``validate``'s numpy code packing equals ``NMMatrix.from_dense``'s and decodes to the
    positions the dense matrix holds (checked against ``np.nonzero``)."""
    rng = np.random.default_rng(0)
    keep = np.argsort(rng.random((6, 4, 5)), axis=1) < 2  # 6 groups of 2:4, 5 columns
    w = (rng.standard_normal((6, 4, 5)) * keep).astype(np.float32).reshape(24, 5)
    nm = NMMatrix.from_dense(w, 2, 4)
    idx = validate.nm_indices(np.asarray(nm.codes), 2, 4, 6)
    for g in range(6):
        for c in range(5):
            assert idx[:, g, c].tolist() == np.nonzero(keep[g, :, c])[0].tolist()
    np.testing.assert_array_equal(validate.nm_codes(idx, 2, 4, nm.codes.dtype),
                                  np.asarray(nm.codes))
