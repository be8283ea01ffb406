"""``sparsejax data prepare``: tokenizers, token shards and their metadata
(sparsejax.run.prepare, sparsejax.run.shards, sparsejax.run.tokenizer)."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from sparsejax import errors
from sparsejax.cli import main
from sparsejax.run import data, prepare, shards, tokenizer

pytest.importorskip("tokenizers")

WORDS = ["alpha", "beta", "gamma", "delta", "sparse", "tensor", "model", "train", "é", "日本"]


def _text(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n_lines))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A tiny text prepared with a 300-token BPE, shards of at most 1000 tokens."""
    tmp = tmp_path_factory.mktemp("prep")
    (tmp / "a.txt").write_text(_text(200))
    prepare.prepare(str(tmp / "a.txt"), "bpe:300", tmp / "out", shard_tokens=1000,
                    progress=False)
    return tmp


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bpe_shards_and_metadata(bpe_dir):
    text = (bpe_dir / "a.txt").read_text()
    out = bpe_dir / "out"
    meta = json.loads((out / shards.METADATA).read_text())
    tok = tokenizer.load_file(out / "tokenizer.json")
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level BPE round trip, non-ASCII included
    assert meta["tokenizer"] == {"kind": "bpe", "spec": "bpe:300", "file": "tokenizer.json"}
    assert meta["vocab_size"] == tok.vocab_size <= 300 and ids.max() < tok.vocab_size
    assert meta["dtype"] == "uint16" and meta["split"] == "tail"
    assert meta["token_count"] == len(ids) < len(text.encode())  # BPE merged something
    # the splits, read back raw, are the encoding: train then the last 5% as validation
    n_val = int(np.ceil(len(ids) * 0.05))
    got = {s: np.concatenate([np.fromfile(out / r["file"], "<u2") for r in meta["shards"]
                              if r["split"] == s]) for s in shards.SPLITS}
    np.testing.assert_array_equal(got["train"], ids[: len(ids) - n_val])
    np.testing.assert_array_equal(got["val"], ids[len(ids) - n_val:])
    assert [r["file"] for r in meta["shards"]][:2] == ["train-00000.bin", "train-00001.bin"]
    assert all(r["tokens"] <= 1000 and r["sha256"] == _sha(out / r["file"])
               for r in meta["shards"])


def test_sharded_corpus_reads_the_same_windows(bpe_dir):
    out = bpe_dir / "out"
    corpus = data.load_corpus(out)
    assert isinstance(corpus.train, shards.ShardedTokens) and corpus.vocab_size <= 300
    flat = np.asarray(corpus.train)
    assert len(flat) == len(corpus.train) > 2000
    x, y = data.get_batch(corpus.train, seed=1, step=7, batch_size=8, seq_len=64)
    x2, y2 = data.get_batch(flat, seed=1, step=7, batch_size=8, seq_len=64)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    # windows across the shard boundary at 1000 come out whole
    np.testing.assert_array_equal(corpus.train[np.arange(990, 1010)], flat[990:1010])


def test_uint32_writer_and_reader(tmp_path):
    """vocab > 65,536: a word-level tokenizer.json of 70,000 words gives ids past uint16."""
    tk = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(70_000)}
    tok = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "words.json"))
    ids = np.random.default_rng(0).integers(0, 70_000, 400)
    (tmp_path / "t.txt").write_text(" ".join(f"w{i}" for i in ids))
    meta = prepare.prepare(str(tmp_path / "t.txt"), str(tmp_path / "words.json"),
                           tmp_path / "out", progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    assert meta["tokenizer"]["kind"] == "file"
    corpus = data.load_corpus(tmp_path / "out")
    assert corpus.train.dtype == np.uint32 and corpus.train.max() > 65_535
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), ids)
    # the writer can be forced to uint32 for a byte vocab too
    w = shards.ShardWriter(tmp_path, "uint32", 3)
    w.add("train", np.array([1, 2, 255, 7]))
    recs = w.close()
    assert [r["tokens"] for r in recs] == [3, 1]
    assert np.fromfile(tmp_path / "train-00000.bin", "<u4").tolist() == [1, 2, 255]
    with pytest.raises(errors.InputError, match="do not fit uint16"):
        shards.ShardWriter(tmp_path, "uint16", 10).add("val", np.array([70_000]))


def test_bytes_of_a_folder_split_by_file_like_the_byte_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02d}.py").write_text(f"x = {i}\n" * (i + 1))
    meta = prepare.prepare(str(src), "bytes", tmp_path / "out", progress=False)
    corpus = data.load_corpus(tmp_path / "out")
    ref = data.load_corpus(src, cache_dir=tmp_path / "cache")
    assert meta["split"] == "hash" and meta["dtype"] == "uint16" and corpus.vocab_size == 256
    np.testing.assert_array_equal(corpus.train, ref.train)
    np.testing.assert_array_equal(corpus.val, ref.val)


def test_metadata_is_checked_against_the_shards(bpe_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(bpe_dir / "out", out)
    shards.load_prepared(out, verify=True)
    shard = out / "val-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 1
    shard.write_bytes(bytes(raw))
    shards.load_prepared(out)  # sizes still agree: only the checksum can tell
    with pytest.raises(errors.InputError, match="val-00000.bin: sha256 differs"):
        shards.load_prepared(out, verify=True)
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(errors.InputError, match=r"val-00000.bin: \d+ bytes, the metadata says"):
        data.load_corpus(out)
    meta = json.loads((out / shards.METADATA).read_text())
    meta["token_count"] += 1
    (out / shards.METADATA).write_text(json.dumps(meta))
    with pytest.raises(errors.InputError, match="token_count"):
        data.load_corpus(out)


def test_a_config_whose_vocab_or_split_disagrees_is_refused(bpe_dir):
    out = bpe_dir / "out"
    vocab = data.load_corpus(out).vocab_size
    assert data.load_corpus(out, vocab_size=vocab).vocab_size == vocab
    with pytest.raises(errors.ConfigError, match=rf"data.vocab_size must be 0 .* or {vocab}"):
        data.load_corpus(out, vocab_size=vocab + 1)
    with pytest.raises(errors.ConfigError, match="data.val_fraction must be 0.05"):
        data.load_corpus(out, val_fraction=0.1)


@pytest.mark.parametrize("args, match", [
    (["nope", "--tokenizer", "bytes"], "SOURCE: no such file"),
    (["{src}", "--tokenizer", "bpe:100"], r"bpe:VOCAB_SIZE needs an int in \(256"),
    (["{src}", "--tokenizer", "nofile.json"], "not 'bytes', 'bpe:VOCAB_SIZE' or an existing"),
    (["{src}", "--tokenizer", "{src}"], "is not a tokenizers JSON file"),
])
def test_prepare_command_errors(tmp_path, capsys, args, match):
    src = tmp_path / "a.txt"
    src.write_text("hello\n" * 50)
    argv = ["data", "prepare", *[a.format(src=src) for a in args], "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsejax: error:"), err
    assert __import__("re").search(match, err[0]), err[0]


def test_prepare_and_verify_commands(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text(_text(50))
    assert main(["data", "prepare", str(src), "--tokenizer", "bytes", "--out",
                 str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    n = len(src.read_bytes())
    assert f"wrote {tmp_path / 'o'}: {n:,} uint16 tokens" in captured.out
    assert "prepare: encode 1/1 files (100%)" in captured.err  # plain lines, not a tty
    assert main(["data", "verify", str(tmp_path / "o")]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["data", "prepare", str(src), "--tokenizer", "bytes", "--out",
                 str(tmp_path / "o")]) == 2  # not an empty folder
    assert "is not an empty folder" in capsys.readouterr().err



def test_a_runs_vocab_comes_from_the_metadata(bpe_dir):
    """``data.source`` = the folder: the corpus's vocab is the metadata's, a config's
    ``data.vocab_size`` must agree (training on it: tests/test_wandb.py)."""
    from conftest import tiny_config

    from sparsejax.run import configlib

    out = bpe_dir / "out"
    vocab = json.loads((out / shards.METADATA).read_text())["vocab_size"]
    spec = configlib.validate(tiny_config(data__source=str(out)))
    assert data.load_spec(spec.data).vocab_size == vocab
    from sparsejax.run import memory

    assert memory.corpus_vocab(spec) == vocab  # the memory check plans the real embedding
    bad = configlib.validate(tiny_config(data__source=str(out), data__vocab_size=vocab + 1))
    with pytest.raises(errors.ConfigError, match="config.data.vocab_size must be 0"):
        data.load_spec(bad.data)


def test_a_failed_prepare_leaves_no_folder(tmp_path):
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(errors.InputError, match="too short: the train split has 0 tokens"):
        prepare.prepare(str(tmp_path / "one.txt"), "bytes", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_runs_tokenizer_is_never_guessed(tmp_path):
    with pytest.raises(errors.MissingInputError, match="no longer exists"):
        tokenizer.for_source(str(tmp_path / "gone"))
    (tmp_path / "t.bin").write_bytes(b"\0\1" * 10)
    with pytest.raises(errors.InputError, match="no tokenizer"):
        tokenizer.for_source(str(tmp_path / "t.bin"))
    assert tokenizer.for_source("").kind == "bytes"
