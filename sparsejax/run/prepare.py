"""``sparsejax data prepare``: text to token shards (docs/design.md, "Data";
:mod:`sparsejax.run.shards` for the folder's layout).

``SOURCE`` is the built-in corpus (``stdlib``, the ``""`` of ``data.source``, or
``stdlib-tests``), a folder of text files or one text file, chosen and split exactly as
:func:`sparsejax.run.data.load_corpus` does for bytes: a folder's files go whole to validation
by ``crc32(relative_path) % round(1 / val_fraction) == 0`` (``split: hash``), one file (or a
folder whose rule leaves a split empty) keeps the last ``val_fraction`` of its tokens for
validation (``split: tail``). The tokenizer is ``bytes``, ``bpe:VOCAB_SIZE`` (a byte-level BPE
trained here on the training files only, with Hugging Face ``tokenizers``) or the path of a
local ``tokenizer.json``; it is saved in the folder. Each file is encoded on its own, in pieces
of about 1 MiB cut after a newline. Nothing is downloaded.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from sparsejax import errors
from sparsejax.run import data, shards, tokenizer

BUILTIN = "stdlib"  # the SOURCE naming data.source's "" (the built-in corpus)
PIECE_BYTES = 1 << 20
SHARD_TOKENS = 100_000_000
_CHUNK = 1 << 24  # tokens copied per step from the staging files into shards


class _Progress:
    """Files done: a tqdm bar on a terminal, else a plain line at every tenth."""

    def __init__(self, what: str, total: int, enabled: bool, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.what, self.total, self.enabled = what, total, enabled
        self.plain = enabled and not self.stream.isatty()
        self.t0, self.n, self.next_line = time.monotonic(), 0, 0
        self.bar = tqdm(total=total, unit="file", desc=what, file=self.stream,
                        disable=not enabled or self.plain, dynamic_ncols=True, mininterval=0.5)

    def update(self, tokens: int | None = None) -> None:
        self.n += 1
        if self.plain and (self.n >= self.next_line or self.n == self.total):
            extra = f", {tokens:,} tokens" if tokens is not None else ""
            self.stream.write(f"prepare: {self.what} {self.n}/{self.total} files "
                              f"({100 * self.n // max(self.total, 1)}%){extra}, "
                              f"{time.monotonic() - self.t0:.0f}s\n")
            self.stream.flush()
            self.next_line = self.n + max(1, self.total // 10)
        elif not self.plain:
            if tokens is not None:
                self.bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def parse_tokenizer(spec: str) -> tuple[str, int | Path | None]:
    """``("bytes", None)``, ``("bpe", VOCAB_SIZE)`` or ``("file", PATH)`` of ``--tokenizer``."""
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("bpe:"):
        n = spec[4:]
        if not n.isdigit() or int(n) <= tokenizer.BYTE_VOCAB or int(n) > 2**32:
            raise errors.InputError(f"--tokenizer {spec!r}: bpe:VOCAB_SIZE needs an int in "
                                    f"({tokenizer.BYTE_VOCAB}, 2**32]")
        return "bpe", int(n)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise errors.MissingInputError(f"--tokenizer {spec!r}: not 'bytes', 'bpe:VOCAB_SIZE' or "
                                       "an existing tokenizer.json file")
    return "file", path


def source_files(source: str, val_fraction: float) -> tuple[Path, list[str], list[str], str]:
    """``(root, train_files, val_files, split)`` of ``SOURCE`` (relative paths; for one file
    ``root`` is the file and both lists are ``[""]`` and ``[]``)."""
    every = max(2, round(1 / val_fraction))
    if source in ("", BUILTIN, data.STDLIB_TESTS):
        root = data.stdlib_root()
        rels = (data.stdlib_test_files(root) if source == data.STDLIB_TESTS
                else data.stdlib_files(root))
    else:
        root = Path(source).expanduser()
        if not root.exists():
            raise data.CorpusNotFoundError(f"SOURCE: no such file or folder: {source!r} (or "
                                           f"the built-in '{BUILTIN}', '{data.STDLIB_TESTS}')")
        if root.is_file():
            if root.stat().st_size == 0:
                raise errors.InputError(f"SOURCE: {source!r} is empty")
            return root, [""], [], "tail"
        rels = data.text_files(root)
    if not rels:
        raise errors.InputError(f"SOURCE: no usable files under {root}")
    val = [r for r in rels if data.is_val_file(r, every)]
    train = [r for r in rels if not data.is_val_file(r, every)]
    if not train or not val:
        return root, rels, [], "tail"
    return root, train, val, "hash"


def _read(root: Path, rel: str) -> bytes:
    return (root / rel).read_bytes() if rel else root.read_bytes()


def _pieces(text: str) -> list[str]:
    """``text`` cut after a newline about every :data:`PIECE_BYTES` characters."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + PIECE_BYTES)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _encode(tok: Any, raw: bytes) -> np.ndarray:
    if tok.kind == "bytes":
        return np.frombuffer(raw, np.uint8)
    pieces = _pieces(raw.decode("utf-8", errors="replace"))
    return np.concatenate(tok.encode_batch(pieces)) if pieces else np.zeros(0, np.int64)


def _train_texts(root: Path, train: list[str], split: str, val_fraction: float,
                 progress: _Progress) -> Iterator[str]:
    for rel in train:
        raw = _read(root, rel)
        if split == "tail" and len(train) == 1:  # one file: leave its validation tail out
            raw = raw[: len(raw) - math.ceil(len(raw) * val_fraction)]
        yield from _pieces(raw.decode("utf-8", errors="replace"))
        progress.update()


def make_tokenizer(spec: str, root: Path, train: list[str], split: str, val_fraction: float,
                   progress: bool = True) -> tuple[str, tokenizer.Tokenizer]:
    """``(kind, tokenizer)`` of ``--tokenizer spec``; ``bpe:N`` is trained on ``train``."""
    kind, arg = parse_tokenizer(spec)
    if kind == "bytes":
        return kind, tokenizer.ByteTokenizer()
    if kind == "file":
        return kind, tokenizer.load_file(arg)
    bar = _Progress("read for bpe", len(train), progress)
    t0 = time.monotonic()
    try:
        tok = tokenizer.train_bpe(_train_texts(root, train, split, val_fraction, bar), int(arg))
    finally:
        bar.close()
    if progress:
        print(f"prepare: trained a {tok.vocab_size}-token BPE in {time.monotonic() - t0:.0f}s",
              file=sys.stderr)
    return kind, tok


def prepare(source: str, tokenizer_spec: str, out: str | os.PathLike, *,
            val_fraction: float = 0.05, shard_tokens: int = SHARD_TOKENS,
            progress: bool = True, dtype: str | None = None) -> dict[str, Any]:
    """Tokenize ``source`` into shards in ``out`` (a new or empty folder) and return the
    metadata written there (module docstring). ``dtype`` forces the shards' dtype (default by
    vocab size: :func:`sparsejax.run.shards.dtype_for`)."""
    if not isinstance(val_fraction, int | float) or not 0 < val_fraction <= 0.5:
        raise errors.InputError(f"--val-fraction must be in (0, 0.5], got {val_fraction!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise errors.InputError(f"--shard-tokens must be an int >= 1, got {shard_tokens!r}")
    parse_tokenizer(tokenizer_spec)  # a bad --tokenizer fails before any work
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise errors.InputError(f"--out {str(out)!r} exists and is not an empty folder")
    root, train, val, split = source_files(source, val_fraction)
    kind, tok = make_tokenizer(tokenizer_spec, root, train, split, val_fraction, progress)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write(out, tok, kind, tokenizer_spec, source, root, train, val, split,
                      val_fraction, shard_tokens, progress, dtype)
    except BaseException:  # leave no half-written folder behind (not even on Ctrl-C)
        for p in list(out.iterdir()):
            p.unlink()
        if created:
            out.rmdir()
        raise


def _write(out: Path, tok: tokenizer.Tokenizer, kind: str, tokenizer_spec: str, source: str,
           root: Path, train: list[str], val: list[str], split: str, val_fraction: float,
           shard_tokens: int, progress: bool, dtype: str | None) -> dict[str, Any]:
    vocab = tok.vocab_size
    dtype = dtype or shards.dtype_for(vocab)
    stage = {s: out / f".{s}.staging" for s in shards.SPLITS}
    np_dtype = np.dtype(shards.DTYPES[dtype]).newbyteorder("<")
    bar = _Progress("encode", len(train) + len(val), progress)
    count = 0
    try:
        with open(stage["train"], "wb") as ft, open(stage["val"], "wb") as fv:
            for rels, f in ((train, ft), (val, fv)):
                for rel in rels:
                    ids = _encode(tok, _read(root, rel))
                    if ids.size and ids.max() >= vocab:
                        raise errors.InputError(f"tokenizer gave id {ids.max()} >= its vocab "
                                                f"size {vocab}")
                    if ids.size and ids.max() > np.iinfo(np_dtype).max:
                        raise errors.InputError(f"token ids up to {ids.max()} do not fit {dtype}")
                    f.write(ids.astype(np_dtype).tobytes())
                    count += ids.size
                    bar.update(count)
        records = _shard(out, stage, split, val_fraction, dtype, shard_tokens)
    finally:
        bar.close()
        for p in stage.values():
            p.unlink(missing_ok=True)
    tok_meta: dict[str, Any] = {"kind": kind, "spec": tokenizer_spec, "file": None}
    if kind != "bytes":
        tok.save(out / "tokenizer.json")
        tok_meta["file"] = "tokenizer.json"
    meta = {"tokenizer": tok_meta, "vocab_size": vocab, "dtype": dtype,
            "token_count": sum(r["tokens"] for r in records), "val_fraction": val_fraction,
            "split": split, "source": source or BUILTIN,
            "n_files": len(train) + len(val), "shards": records}
    shards.write_metadata(out, meta)
    return shards.read_metadata(out)


def _shard(out: Path, stage: dict[str, Path], split: str, val_fraction: float, dtype: str,
           shard_tokens: int) -> list[dict[str, Any]]:
    """Copy the staged token streams into shards (a tail split moves the end of train to val)."""
    np_dtype = np.dtype(shards.DTYPES[dtype]).newbyteorder("<")
    streams = {s: (np.memmap(p, dtype=np_dtype, mode="r") if p.stat().st_size
                   else np.zeros(0, np_dtype)) for s, p in stage.items()}
    pieces = {"train": [streams["train"]], "val": [streams["val"]]}
    if split == "tail":
        allt = streams["train"]
        n_val = math.ceil(len(allt) * val_fraction)
        pieces = {"train": [allt[: len(allt) - n_val]], "val": [allt[len(allt) - n_val:]]}
    writer = shards.ShardWriter(out, dtype, shard_tokens)
    try:
        for s in shards.SPLITS:
            for arr in pieces[s]:
                for i in range(0, len(arr), _CHUNK):
                    writer.add(s, np.asarray(arr[i: i + _CHUNK]))
    finally:
        records = writer.close()
    for s in shards.SPLITS:
        n = sum(r["tokens"] for r in records if r["split"] == s)
        if n < 2:
            raise errors.InputError(f"SOURCE is too short: the {s} split has {n} tokens "
                                    "(needs >= 2)")
    return records
