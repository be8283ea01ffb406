"""Token corpora and batches (docs/design.md, "Data").

Sources understood by :func:`load_corpus`:

* ``None`` (or ``""``): the default byte-level corpus, the ``.py`` files of the running
  interpreter's standard library (no download), excluding ``site-packages``, ``test``,
  ``tests``, ``idlelib`` and ``lib2to3`` path components, sorted by relative path and
  concatenated as bytes (vocab 256). A file goes to validation when
  ``crc32(relative_path) % round(1 / val_fraction) == 0`` (0 mod 20 by default).
* ``"stdlib-tests"``: the other domain of the same interpreter, the ``.py`` files under its
  standard library's ``test``/``tests`` folders (which the default corpus leaves out;
  ``site-packages``, ``idlelib`` and ``lib2to3`` still excluded), same split rules. For
  fine-tuning on a domain the pre-training never saw (``configs/finetune.py``).
* a prepared folder (``sparsejax data prepare``, :mod:`sparsejax.run.shards`): its token
  shards, memory-mapped, split as prepared; vocab from its metadata (a ``vocab_size`` or
  ``val_fraction`` that disagrees with it is refused); the metadata is checked against the
  shard files (sizes, counts), their sha256 only on demand (``sparsejax data verify``).
* a folder: every non-hidden file without NUL bytes in its first 8 KiB, same rules.
* a text file: its bytes, memory-mapped; the last ``val_fraction`` is validation.
* a ``.bin`` file: ``uint16`` tokens, memory-mapped (never loaded into RAM); vocab is
  ``max + 1`` unless given; the last ``val_fraction`` is validation.

Concatenated corpora are cached as ``.npy`` files in ``cache_dir`` (``$SPARSEJAX_CACHE_DIR``
or ``~/.cache/sparsejax``, the folder the compiled CPU kernels also use), keyed by a
fingerprint of every source file (relative path, size, mtime), so a hit reads no source
file; the corpus name carries the sha256 of the bytes.
Batches are pure functions of ``(seed, step)``: resuming needs no iterator state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sparsejax import errors
from sparsejax.run import shards
from sparsejax.run.spec import DataSpec

EXCLUDED_DIRS = ("site-packages", "test", "tests", "idlelib", "lib2to3")
TEST_DIRS = ("test", "tests")
STDLIB_TESTS = "stdlib-tests"  # data.source naming the standard library's test files
_CACHE_VERSION = 1


class Corpus(NamedTuple):
    # shape=(N_train,), uint8 (bytes), uint16 (.bin) or uint16/uint32 (prepared); often a
    # memmap, or a ShardedTokens over several
    train: np.ndarray | shards.ShardedTokens
    val: np.ndarray  # shape=(N_val,), same dtype
    vocab_size: int
    name: str


class CorpusNotFoundError(errors.MissingInputError):
    """The corpus source does not exist (a :class:`~sparsejax.errors.MissingInputError`: both a
    ``FileNotFoundError`` and a ``ValueError``; exit status 2)."""


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSEJAX_CACHE_DIR") or Path.home() / ".cache" / "sparsejax")


def stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the default corpus's ``.py`` files under ``root``, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune the walk
        rel_dir = Path(dirpath).relative_to(root)
        out += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(out)


def stdlib_test_files(root: Path) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root`` with a ``test``/``tests``
    folder in their path (outside ``site-packages``, ``idlelib``, ``lib2to3``), sorted."""
    skip = tuple(d for d in EXCLUDED_DIRS if d not in TEST_DIRS)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        rel_dir = Path(dirpath).relative_to(root)
        if any(part in TEST_DIRS for part in rel_dir.parts):
            out += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(out)


def is_val_file(relpath: str, every: int = 20) -> bool:
    """Stable split rule: ``crc32(relpath) % every == 0`` (not Python's salted ``hash``)."""
    return zlib.crc32(relpath.encode("utf-8")) % every == 0


def text_files(root: Path) -> list[str]:
    """Relative POSIX paths of the non-hidden files under ``root`` without a NUL byte in
    their first 8 KiB, sorted."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            with open(p, "rb") as f:
                if b"\0" not in f.read(8192):
                    out.append(rel)
    return sorted(out)


def _read_concat(root: Path, rels: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join((root / r).read_bytes() for r in rels), dtype=np.uint8)


def _check_fraction(val_fraction: float) -> None:
    if not isinstance(val_fraction, int | float) or not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")


def _tail_split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = math.ceil(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def _folder_corpus(
    root: Path, rels: list[str], every: int, cache_dir: Path, prefix: str, val_fraction: float
) -> Corpus:
    if not rels:
        raise errors.InputError(f"source: no usable files under {root} (the corpus is empty)")
    stat = [(r, (root / r).stat()) for r in rels]
    desc = [_CACHE_VERSION, every, val_fraction, [(r, s.st_size, s.st_mtime_ns) for r, s in stat]]
    key = hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:20]
    base = f"{prefix}-{key}"
    paths = {k: Path(cache_dir) / f"{base}.{k}.npy" for k in ("train", "val")}
    meta_path = Path(cache_dir) / f"{base}.json"
    if not (meta_path.exists() and all(p.exists() for p in paths.values())):
        train_rels = [r for r in rels if not is_val_file(r, every)]
        val_rels = [r for r in rels if is_val_file(r, every)]
        train, val = _read_concat(root, train_rels), _read_concat(root, val_rels)
        split = "hash"
        if len(train) < 2 or len(val) < 2:  # too few files for a per-file split
            train, val = _tail_split(np.concatenate([train, val]), val_fraction)
            split = "tail"
        digest = hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        for k, arr in (("train", train), ("val", val)):
            tmp = paths[k].with_name(f"{paths[k].name}.tmp{os.getpid()}.npy")
            np.save(tmp, arr)
            os.replace(tmp, paths[k])
        meta = dict(sha256=digest, n_files=len(rels), n_val_files=len(val_rels), split=split)
        tmp = meta_path.with_name(f"{meta_path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)
    meta = json.loads(meta_path.read_text())
    train, val = (np.load(paths[k], mmap_mode="r") for k in ("train", "val"))
    return Corpus(train, val, 256, f"{prefix}:{meta['sha256'][:12]}")


def load_corpus(
    source: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    vocab_size: int | None = None,
) -> Corpus:
    """Load a token corpus (see the module docstring for the sources and split rules).

    ``vocab_size``: ``.bin`` tokens' vocab (default ``max + 1``, one pass over the memmap);
    at least 256 for bytes (default 256); for a prepared folder ``None`` or its metadata's
    (:class:`~sparsejax.errors.ConfigError` naming ``data.vocab_size`` otherwise).
    """
    _check_fraction(val_fraction)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    every = max(2, round(1 / val_fraction))
    if source is None or str(source) == "":
        root = stdlib_root()
        vi = sysconfig.get_python_version()
        return _folder_corpus(
            root, stdlib_files(root), every, cache_dir, f"stdlib{vi}", val_fraction
        )
    if str(source) == STDLIB_TESTS:
        root = stdlib_root()
        vi = sysconfig.get_python_version()
        return _folder_corpus(
            root, stdlib_test_files(root), every, cache_dir, f"stdlib{vi}-tests", val_fraction
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise CorpusNotFoundError(f"source: no such file or folder: {str(path)!r}")
    if path.is_dir() and shards.is_prepared(path):
        return _prepared_corpus(path, val_fraction, vocab_size)
    if path.is_dir():
        name = path.resolve().name or "corpus"
        return _folder_corpus(path, text_files(path), every, cache_dir, name, val_fraction)
    size = path.stat().st_size
    if size == 0:
        raise errors.InputError(f"source: {str(path)!r} is empty")
    if path.suffix == ".bin":
        if size % 2:
            raise errors.InputError(f"source: {str(path)!r} has an odd byte count; expected uint16")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        vocab = int(tokens.max()) + 1 if vocab_size is None else vocab_size
    else:
        tokens = np.memmap(path, dtype=np.uint8, mode="r")
        vocab = 256 if vocab_size is None else vocab_size
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < tokens.dtype.itemsize:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if path.suffix != ".bin" and vocab < 256:
        raise ValueError(f"vocab_size must be >= 256 for a byte corpus, got {vocab_size!r}")
    if path.suffix == ".bin" and vocab_size is not None and int(tokens.max()) >= vocab:
        raise errors.InputError(f"source: {str(path)!r} holds token id {int(tokens.max())}, "
                                f"not below vocab_size={vocab}")
    train, val = _tail_split(tokens, val_fraction)
    if len(train) < 2 or len(val) < 2:
        raise errors.InputError(f"source: {str(path)!r} is too short to split "
                                f"({len(tokens)} tokens)")
    return Corpus(train, val, vocab, path.name)


def _prepared_corpus(path: Path, val_fraction: float, vocab_size: int | None) -> Corpus:
    prep = shards.load_prepared(path)
    meta_file = path / shards.METADATA
    if vocab_size is not None and vocab_size != prep.vocab_size:
        raise errors.ConfigError(f"config.data.vocab_size must be 0 (from the data) or "
                                 f"{prep.vocab_size} (the vocab of {meta_file}), got {vocab_size}")
    if not math.isclose(val_fraction, prep.meta["val_fraction"]):
        raise errors.ConfigError(f"config.data.val_fraction must be {prep.meta['val_fraction']} "
                                 f"(the split of {meta_file}), got {val_fraction}")
    return Corpus(prep.train, prep.val, prep.vocab_size, prep.name)


def load_spec(spec: DataSpec) -> Corpus:
    """:func:`load_corpus` of a run's ``data`` section (``source`` "" = the built-in corpus;
    ``vocab_size`` 0 = the data's)."""
    if 0 < spec.vocab_size < 256 and not (spec.source.endswith(".bin")
                                          or (spec.source and shards.is_prepared(spec.source))):
        raise errors.ConfigError(f"config.data.vocab_size must be 0 (the data's) or >= 256 for "
                                 f"a byte corpus, got {spec.vocab_size}")
    return load_corpus(spec.source or None, cache_dir=spec.cache_dir or None,
                       val_fraction=spec.val_fraction, vocab_size=spec.vocab_size or None)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_tokens(tokens: np.ndarray, seq_len: int) -> None:
    if getattr(tokens, "ndim", None) != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {getattr(tokens, 'shape', '?')}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"seq_len={seq_len} needs at least seq_len + 1 = {seq_len + 1} tokens, the corpus "
            f"split has {len(tokens)}"
        )


def _windows(tokens: np.ndarray, starts_N: np.ndarray, seq_len: int):
    idx_NxL1 = starts_N[:, None] + np.arange(seq_len + 1)
    w_NxL1 = np.asarray(tokens[idx_NxL1], dtype=np.int32)  # one gather; memmap-friendly
    return np.ascontiguousarray(w_NxL1[:, :-1]), np.ascontiguousarray(w_NxL1[:, 1:])


def get_batch(
    tokens: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs_BxL, targets_BxL)`` int32, a pure function of ``(seed, step)``.

    Start offsets are drawn uniformly by ``np.random.default_rng((seed, step))``; targets are
    the inputs shifted by one token.
    """
    for name, value, lo in (
        ("seed", seed, 0),
        ("step", step, 0),
        ("batch_size", batch_size, 1),
        ("seq_len", seq_len, 1),
    ):
        _check_int(name, value, lo)
    _check_tokens(tokens, seq_len)
    rng = np.random.default_rng((int(seed), int(step)))
    starts_B = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    return _windows(tokens, starts_B, seq_len)


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, n_batches: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic validation batches: ``batch_size · n_batches`` windows, one drawn
    uniformly inside each of as many equal strata of the split (stratified, so the whole
    split is covered evenly)."""
    for name, value, lo in (
        ("batch_size", batch_size, 1),
        ("seq_len", seq_len, 1),
        ("n_batches", n_batches, 1),
        ("seed", seed, 0),
    ):
        _check_int(name, value, lo)
    _check_tokens(tokens, seq_len)
    n = batch_size * n_batches
    width = (len(tokens) - seq_len) / n  # starts live in [0, len - seq_len)
    u_N = np.random.default_rng(int(seed)).random(n)
    starts_N = ((np.arange(n) + u_N) * width).astype(np.int64)
    starts_N = np.minimum(starts_N, len(tokens) - seq_len - 1)
    x_NxL, y_NxL = _windows(tokens, starts_N, seq_len)
    return [
        (x_NxL[i * batch_size : (i + 1) * batch_size], y_NxL[i * batch_size : (i + 1) * batch_size])
        for i in range(n_batches)
    ]
