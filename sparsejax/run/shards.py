"""Prepared token data on disk (docs/design.md, "Data"): token shards and their metadata.

A prepared folder (written by :mod:`sparsejax.run.prepare`) holds:

* ``train-NNNNN.bin`` / ``val-NNNNN.bin``: raw little-endian token ids, ``uint16`` when the
  vocab has at most 65,536 tokens, else ``uint32``; each split is its shards in order;
* ``tokenizer.json`` for a BPE or file tokenizer (none for bytes);
* :data:`METADATA` (``sparsejax-data.json``): ``format``, ``version``, ``tokenizer``
  (``kind`` bytes|bpe|file, ``file``, ``spec``), ``vocab_size``, ``dtype``, ``token_count``
  (all splits), ``val_fraction``, ``split`` (hash: whole files to validation; tail: the last
  tokens), ``source`` and ``shards`` (``file``, ``split``, ``tokens``, ``sha256`` each).

:func:`load_prepared` memory-maps the shards (nothing is read into RAM) after checking the
metadata against the files: dtype, vocab fits the dtype, each shard's size is its token count
times the item size, the counts add up to ``token_count``. The sha256 of each shard is read
back only on demand (``verify=True``, ``sparsejax data verify``), as hashing reads every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from sparsejax import errors

METADATA = "sparsejax-data.json"
FORMAT, VERSION = "sparsejax-tokens", 1
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> str:
    """``"uint16"`` when every id of a ``vocab_size`` vocab fits in 16 bits, else ``"uint32"``."""
    if vocab_size > 2**32:
        raise errors.InputError(f"vocab size {vocab_size} does not fit uint32 token ids")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding :data:`METADATA`."""
    return (Path(path) / METADATA).is_file()


class ShardWriter:
    """Writes each split's tokens into shards of at most ``shard_tokens`` tokens of ``dtype``,
    hashing as it goes; :meth:`close` returns the shard records of the metadata."""

    def __init__(self, out: Path, dtype: str, shard_tokens: int):
        if dtype not in DTYPES:
            raise errors.InputError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        self.out, self.dtype, self.shard_tokens = Path(out), np.dtype(DTYPES[dtype]), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._open: dict[str, tuple[BinaryIO, Any, dict[str, Any]]] = {}
        self._count = dict.fromkeys(SPLITS, 0)

    def add(self, split: str, tokens: np.ndarray) -> None:
        """Append ``tokens`` (ints in the dtype's range) to ``split``."""
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise errors.InputError(f"token ids {tokens.min()}..{tokens.max()} do not fit "
                                    f"{self.dtype.name}")
        tokens = tokens.astype(self.dtype)
        while tokens.size:
            f, h, rec = self._shard(split)
            take = tokens[: self.shard_tokens - rec["tokens"]]
            data = take.astype(self.dtype.newbyteorder("<")).tobytes()
            f.write(data)
            h.update(data)
            rec["tokens"] += take.size
            tokens = tokens[take.size:]
            if rec["tokens"] == self.shard_tokens:
                self._finish(split)

    def _shard(self, split: str) -> tuple[BinaryIO, Any, dict[str, Any]]:
        if split not in self._open:
            name = f"{split}-{self._count[split]:05d}.bin"
            self._count[split] += 1
            rec = {"file": name, "split": split, "tokens": 0, "sha256": ""}
            self._open[split] = (open(self.out / name, "wb"), hashlib.sha256(), rec)
        return self._open[split]

    def _finish(self, split: str) -> None:
        f, h, rec = self._open.pop(split)
        f.close()
        rec["sha256"] = h.hexdigest()
        self.shards.append(rec)

    def close(self) -> list[dict[str, Any]]:
        """Close the open shards; the records of every shard, train's first, in order."""
        for split in list(self._open):
            self._finish(split)
        return sorted(self.shards, key=lambda r: (SPLITS.index(r["split"]), r["file"]))


def write_metadata(out: Path, meta: dict[str, Any]) -> None:
    """:data:`METADATA` in ``out``, written atomically (a reader never sees half of it)."""
    tmp = Path(out) / f".{METADATA}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta}, indent=1) + "\n")
    os.replace(tmp, Path(out) / METADATA)


def read_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """A prepared folder's metadata, its fields checked (each error names the file)."""
    path = Path(folder) / METADATA
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise errors.MissingInputError(f"{path}: no such file (not a prepared folder)") from e
    except (OSError, ValueError) as e:
        raise errors.InputError(f"{path}: not readable JSON ({e})") from e

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise errors.InputError(f"{path}: {what}")

    need(isinstance(meta, dict) and meta.get("format") == FORMAT,
         f"format must be {FORMAT!r}")
    need(meta.get("version") == VERSION, f"version must be {VERSION}, got {meta.get('version')!r}")
    need(meta.get("dtype") in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got "
         f"{meta.get('dtype')!r}")
    vocab = meta.get("vocab_size")
    bits = np.iinfo(DTYPES[meta["dtype"]]).bits
    need(isinstance(vocab, int) and 2 <= vocab <= 2**bits,
         f"vocab_size must be an int in [2, 2**{bits}] for {meta['dtype']}, got {vocab!r}")
    tok = meta.get("tokenizer")
    need(isinstance(tok, dict) and tok.get("kind") in ("bytes", "bpe", "file"),
         "tokenizer.kind must be one of ('bytes', 'bpe', 'file')")
    need(tok["kind"] == "bytes" or isinstance(tok.get("file"), str),
         "tokenizer.file must name the tokenizer's JSON file")
    shards = meta.get("shards")
    need(isinstance(shards, list) and all(
        isinstance(s, dict) and s.get("split") in SPLITS and isinstance(s.get("tokens"), int)
        and isinstance(s.get("file"), str) and "/" not in s["file"] for s in shards),
         "shards must be a list of {file, split (train|val), tokens, sha256}")
    total = sum(s["tokens"] for s in shards)
    need(meta.get("token_count") == total, f"token_count {meta.get('token_count')!r} is not the "
         f"sum of the shards' tokens ({total})")
    return meta


class ShardedTokens:
    """Several memory-mapped shards seen as one 1-D token array (what :mod:`sparsejax.run.data`
    indexes: ``len``, integer-array gathers and slices)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype
        self.shape = (int(self.offsets[-1]),)
        self.ndim = 1

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu" or (idx.size and (idx.min() < 0 or idx.max() >= len(self))):
            raise IndexError(f"token index out of range [0, {len(self)})")
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty(idx.shape, self.dtype)
        for k in np.unique(part):
            sel = part == k
            out[sel] = self.parts[k][idx[sel] - self.offsets[k]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype)


class Prepared(NamedTuple):
    train: np.ndarray | ShardedTokens
    val: np.ndarray | ShardedTokens
    vocab_size: int
    name: str
    meta: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def load_prepared(folder: str | os.PathLike, *, verify: bool = False) -> Prepared:
    """A prepared folder's splits, memory-mapped, after the checks of the module docstring;
    ``verify=True`` also compares every shard's sha256 with the metadata's."""
    folder = Path(folder)
    meta = read_metadata(folder)
    dtype = np.dtype(DTYPES[meta["dtype"]]).newbyteorder("<")
    splits: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for rec in meta["shards"]:
        path = folder / rec["file"]
        if not path.is_file():
            raise errors.MissingInputError(f"{folder / METADATA}: shard {rec['file']} is missing")
        size, want = path.stat().st_size, rec["tokens"] * dtype.itemsize
        if size != want:
            raise errors.InputError(f"{path}: {size} bytes, the metadata says {rec['tokens']} "
                                    f"{meta['dtype']} tokens ({want} bytes)")
        if verify and _sha256(path) != rec["sha256"]:
            raise errors.InputError(f"{path}: sha256 differs from the metadata's (the shard "
                                    "changed since it was prepared)")
        if rec["tokens"]:
            splits[rec["split"]].append(np.memmap(path, dtype=dtype, mode="r"))
    arrays = {}
    for split, parts in splits.items():
        n = sum(len(p) for p in parts)
        if n < 2:
            raise errors.InputError(f"{folder}: the {split} split has {n} tokens (needs >= 2)")
        arrays[split] = parts[0] if len(parts) == 1 else ShardedTokens(parts)
    digest = hashlib.sha256("".join(r["sha256"] for r in meta["shards"]).encode()).hexdigest()
    name = f"{folder.resolve().name}:{digest[:12]}"
    return Prepared(arrays["train"], arrays["val"], meta["vocab_size"], name, meta)
