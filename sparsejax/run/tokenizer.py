"""Tokenizers of a run's data (docs/design.md, "Data"): bytes (vocab 256, no dependency) or a
Hugging Face ``tokenizers`` file (``tokenizer.json``; the optional extra ``bpe``).

:func:`train_bpe` trains a byte-level BPE locally (GPT-2's pre-tokenizer and byte alphabet,
so every text encodes and ``decode(encode(text)) == text``); :func:`load_file` reads any local
``tokenizer.json``. Nothing is downloaded. :func:`for_source` gives a run's tokenizer from its
``data.source``: a prepared folder's own (:mod:`sparsejax.run.prepare`), bytes for text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sparsejax import errors
from sparsejax.run import shards

BYTE_VOCAB = 256


class Tokenizer(Protocol):
    """What a run needs of a tokenizer."""

    kind: str  # "bytes" or "tokenizers" (a Hugging Face tokenizer.json)
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """``text``'s token ids, int64 shape ``(n,)``."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids``."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); decoding replaces invalid UTF-8 with U+FFFD."""

    kind = "bytes"
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= BYTE_VOCAB):
            raise errors.InputError(f"byte tokens must be in [0, 256), got {ids.min()}.."
                                    f"{ids.max()}")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (encode without special tokens)."""

    kind = "tokenizers"

    def __init__(self, tok: Any):
        self.tok = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """:meth:`encode` of each text (the library's threads)."""
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int64) for e in encs]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.tok.decode([int(i) for i in np.asarray(ids).ravel()],
                               skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        self.tok.save(str(path))


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise errors.InputError("BPE tokenizers need the Hugging Face 'tokenizers' package: pip "
                                "install 'sparsejax[bpe]'") from e
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int, *, length: int | None = None
              ) -> HFTokenizer:
    """A byte-level BPE tokenizer of at most ``vocab_size`` tokens (the 256 byte symbols and
    the merges learnt from ``texts``; fewer when the texts run out of pairs), trained locally."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= BYTE_VOCAB:
        raise errors.InputError(f"bpe vocab size must be an int > {BYTE_VOCAB} (the byte "
                                f"alphabet plus merges), got {vocab_size!r}")
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return HFTokenizer(tok)


def load_file(path: str | os.PathLike) -> HFTokenizer:
    """A local ``tokenizer.json``; :class:`~sparsejax.errors.InputError` naming the file when
    it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise errors.MissingInputError(f"tokenizer: no such file: {str(path)!r}")
    tk = _tokenizers()
    try:
        return HFTokenizer(tk.Tokenizer.from_file(str(path)))
    except Exception as e:  # the library raises its own Exception subclass
        raise errors.InputError(f"tokenizer: {str(path)!r} is not a tokenizers JSON file "
                                f"({' '.join(str(e).split())})") from e


def for_source(source: str) -> Tokenizer:
    """The tokenizer of a run whose ``data.source`` is ``source``: a prepared folder's
    (:func:`sparsejax.run.shards.read_metadata`), bytes for the built-in corpus and text
    files; :class:`~sparsejax.errors.InputError` for a ``.bin`` of token ids (no tokenizer)
    and :class:`~sparsejax.errors.MissingInputError` for a source that is gone (never a
    silent fall back to bytes)."""
    if source and shards.is_prepared(source):
        meta = shards.read_metadata(source)
        if meta["tokenizer"]["kind"] == "bytes":
            return ByteTokenizer()
        return load_file(Path(source) / meta["tokenizer"]["file"])
    if source and source != "stdlib-tests" and not Path(source).expanduser().exists():
        raise errors.MissingInputError(f"data.source {source!r} no longer exists: the run's "
                                       "tokenizer is read from its data")
    if source and Path(source).suffix == ".bin" and Path(source).is_file():
        raise errors.InputError(f"data.source {source!r} is a .bin of token ids with no "
                                "tokenizer: prepare the text with 'sparsejax data prepare'")
    return ByteTokenizer()
