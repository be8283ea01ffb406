"""Data: corpora (default stdlib corpus, folders, text files, .bin memmaps), cache, batches."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from sparsejax.run import data
from sparsejax.run.data import eval_batches, get_batch, load_corpus


def _ramp(n: int = 5000) -> np.ndarray:
    return (np.arange(n) % 60000).astype(np.uint16)


def test_get_batch_is_a_pure_function_of_seed_and_step():
    tokens = _ramp()
    x, y = get_batch(tokens, seed=3, step=7, batch_size=4, seq_len=16)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int32
    x2, y2 = get_batch(tokens, seed=3, step=7, batch_size=4, seq_len=16)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, get_batch(tokens, seed=3, step=8, batch_size=4, seq_len=16)[0])
    assert not np.array_equal(x, get_batch(tokens, seed=4, step=7, batch_size=4, seq_len=16)[0])
    # The ramp makes every window identify its offset: contiguous, targets shifted by one.
    np.testing.assert_array_equal(x - x[:, :1], np.arange(16)[None].repeat(4, 0))
    np.testing.assert_array_equal(y, x + 1)


def test_get_batch_reaches_both_ends():
    tokens = _ramp(18)  # seq_len 16: only starts 0 and 1 fit
    firsts = {
        int(get_batch(tokens, seed=0, step=s, batch_size=8, seq_len=16)[0][i, 0])
        for s in range(8)
        for i in range(8)
    }
    assert firsts == {0, 1}


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(seq_len=5000), "seq_len"),
        (dict(seed=-1), "seed"),
        (dict(step=1.0), "step"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_get_batch_errors(kw, name):
    args = {**dict(seed=0, step=0, batch_size=2, seq_len=8), **kw}
    with pytest.raises(ValueError, match=name):
        get_batch(_ramp(), **args)
    with pytest.raises(ValueError, match="1-D"):
        get_batch(_ramp().reshape(50, 100), seed=0, step=0, batch_size=2, seq_len=8)


def test_eval_batches_deterministic_and_stratified():
    tokens = _ramp(10_000)
    batches = eval_batches(tokens, batch_size=4, seq_len=32, n_batches=5)
    assert len(batches) == 5 and all(x.shape == (4, 32) for x, _ in batches)
    again = eval_batches(tokens, batch_size=4, seq_len=32, n_batches=5)
    for (x, y), (x2, _) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, x + 1)
    starts = np.concatenate([x[:, 0] for x, _ in batches])
    width = (10_000 - 32) / 20
    np.testing.assert_array_less(np.arange(20) * width - 1, starts)  # one start per stratum
    np.testing.assert_array_less(starts, (np.arange(20) + 1) * width)
    other = eval_batches(tokens, batch_size=4, seq_len=32, n_batches=5, seed=1)
    assert not np.array_equal(other[0][0], batches[0][0])
    with pytest.raises(ValueError, match="n_batches"):
        eval_batches(tokens, batch_size=4, seq_len=32, n_batches=0)


def _fake_stdlib(root: Path) -> tuple[list[str], list[str]]:
    """Files in kept and excluded folders; returns (train, val) relative paths in order."""
    kept = [f"pkg{i % 3}/mod{i}.py" for i in range(60)] + ["top.py"]
    skipped = [
        "site-packages/x.py",
        "test/t.py",
        "email/tests/t.py",
        "idlelib/i.py",
        "lib2to3/l.py",
        "pkg0/notes.txt",
    ]
    for i, rel in enumerate(kept + skipped):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(f"# {rel}\nx = {i}\n".encode())
    kept.sort()
    val = [r for r in kept if zlib.crc32(r.encode()) % 20 == 0]
    train = [r for r in kept if zlib.crc32(r.encode()) % 20 != 0]
    assert val and train
    return train, val


def test_default_corpus_split_rule(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    train_rels, val_rels = _fake_stdlib(root)
    monkeypatch.setattr(data, "stdlib_root", lambda: root)
    corpus = load_corpus(cache_dir=tmp_path / "cache")
    want = lambda rels: b"".join((root / r).read_bytes() for r in rels)  # noqa: E731
    assert bytes(corpus.train) == want(train_rels)
    assert bytes(corpus.val) == want(val_rels)
    assert corpus.vocab_size == 256 and corpus.train.dtype == np.uint8
    assert b"site-packages" not in bytes(corpus.train) + bytes(corpus.val)


def test_real_stdlib_corpus(tmp_path):
    corpus = load_corpus(cache_dir=tmp_path)
    root = data.stdlib_root()
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not {"site-packages", "test", "tests", "idlelib", "lib2to3"}
        & set(p.relative_to(root).parts[:-1])
    )
    val = [r for r in rels if zlib.crc32(r.encode()) % 20 == 0]
    assert len(corpus.train) + len(corpus.val) == sum((root / r).stat().st_size for r in rels)
    assert bytes(corpus.val) == b"".join((root / r).read_bytes() for r in val)
    assert 0.01 < len(corpus.val) / len(corpus.train) < 0.2
    assert corpus.name.startswith("stdlib")


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    _fake_stdlib(root)
    monkeypatch.setattr(data, "stdlib_root", lambda: root)
    first = load_corpus(cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2

    def no_reads(*args):
        raise AssertionError("cache miss: source files were read again")

    with monkeypatch.context() as m:
        m.setattr(data, "_read_concat", no_reads)
        second = load_corpus(cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(first.train, second.train)
        assert first.name == second.name
        (root / "top.py").write_bytes(b"# changed, and longer than before\n")
        with pytest.raises(AssertionError, match="cache miss"):
            load_corpus(cache_dir=tmp_path / "cache")
    third = load_corpus(cache_dir=tmp_path / "cache")
    assert third.name != first.name and b"changed" in bytes(third.train) + bytes(third.val)


def test_folder_and_text_file_sources(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"d{i}.txt").write_text(f"document {i} " * 50)
    (folder / ".hidden").write_text("secret")
    (folder / "blob.dat").write_bytes(b"\0\1\2" * 10)
    corpus = load_corpus(folder, cache_dir=tmp_path / "cache")
    text = bytes(corpus.train) + bytes(corpus.val)
    assert len(text) == 3 * len("document 0 " * 50)
    assert b"secret" not in text and b"\0" not in text
    single = tmp_path / "one.txt"
    single.write_bytes(bytes(range(32, 127)) * 10)
    c = load_corpus(single, val_fraction=0.1)
    assert isinstance(c.train, np.memmap) and (len(c.train), len(c.val)) == (855, 95)
    assert bytes(c.train) + bytes(c.val) == single.read_bytes()


def test_bin_memmap_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50_000, size=10_000).astype(np.uint16)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    corpus = load_corpus(path)
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), tokens)
    assert len(corpus.val) == 500 and corpus.vocab_size == int(tokens.max()) + 1
    assert load_corpus(path, vocab_size=50_257).vocab_size == 50_257
    x, y = get_batch(corpus.train, seed=0, step=0, batch_size=3, seq_len=20)
    start = np.flatnonzero(
        np.lib.stride_tricks.sliding_window_view(tokens, 21)
        .__eq__(np.concatenate([x[0], y[0, -1:]]))
        .all(1)
    )
    assert len(start) == 1
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\0\0\0")
    with pytest.raises(ValueError, match="odd byte count"):
        load_corpus(odd)


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "empty_dir", cache_dir=tmp_path / "cache")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        load_corpus(tmp_path / "short.txt")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(tmp_path / "short.txt", val_fraction=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        load_corpus(tmp_path / "short.txt", vocab_size=100)


def test_vocab_size_of_a_config(tmp_path):
    from sparsejax import errors
    from sparsejax.run.spec import DataSpec

    text = tmp_path / "t.txt"
    text.write_bytes(b"abcdef" * 100)
    assert data.load_spec(DataSpec(source=str(text), vocab_size=300)).vocab_size == 300
    with pytest.raises(errors.ConfigError, match=r"config.data.vocab_size must be 0 .* >= 256"):
        data.load_spec(DataSpec(source=str(text), vocab_size=100))
    tokens = tmp_path / "t.bin"
    _ramp(1000).tofile(tokens)  # ids up to 999
    assert data.load_spec(DataSpec(source=str(tokens))).vocab_size == 1000
    with pytest.raises(errors.InputError, match="token id 999, not below vocab_size=999"):
        data.load_spec(DataSpec(source=str(tokens), vocab_size=999))


def test_sharded_tokens_index_like_their_concatenation():
    from sparsejax.run.shards import ShardedTokens

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 60000, n).astype(np.uint16) for n in (5, 1, 17, 9)]
    flat = np.concatenate(parts)
    sharded = ShardedTokens(parts)
    assert len(sharded) == len(flat) and sharded.ndim == 1 and sharded.dtype == np.uint16
    idx = rng.integers(0, len(flat), (7, 6))
    np.testing.assert_array_equal(sharded[idx], flat[idx])
    np.testing.assert_array_equal(sharded[3:25], flat[3:25])
    np.testing.assert_array_equal(np.asarray(sharded), flat)
    x, y = get_batch(sharded, seed=2, step=3, batch_size=4, seq_len=8)
    x2, y2 = get_batch(flat, seed=2, step=3, batch_size=4, seq_len=8)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    with pytest.raises(IndexError):
        sharded[np.array([len(flat)])]
