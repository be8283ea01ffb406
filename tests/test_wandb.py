"""wandb logging (sparsejax.run.outputs): a tiny run of a sweep, offline, read back from its
``.wandb`` file with wandb's own protobuf ``Record``. The run trains on prepared BPE data and
is sampled from too (one training run serves both end-to-end checks, to keep CI short).

wandb 0.x past 0.19 writes offline runs from its Go core and ships no Python reader of the
file, so :func:`records` reads the container: the LevelDB log format wandb uses (a 7-byte
header ``:W&B``, magic ``0xBEE1``, version 0; 32 KiB blocks of chunks ``crc32c:u32 length:u16
type:u8`` with FULL=1, FIRST=2, MIDDLE=3, LAST=4, a block's tail under 7 bytes zero-padded).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("wandb")

BLOCK, HEADER = 32768, 7
ROOT = Path(__file__).resolve().parents[1]


def records(path: Path) -> Iterator[object]:
    """The ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B" and struct.unpack("<HB", raw[4:7]) == (0xBEE1, 0)
    pos, buf = HEADER, b""
    while pos + HEADER <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # zero padding at a block's end
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", raw[pos:pos + HEADER])
        buf += raw[pos + HEADER:pos + HEADER + n]
        pos += HEADER + n
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE...
            yield wandb_internal_pb2.Record.FromString(buf)
            buf = b""


TINY = {"model.n_ctx": 32, "train.seq_len": 32, "train.batch_size": 4, "eval.batch_size": 4,
        "eval.batches": 1, "eval.final_batches": 1, "train.warmup_steps": 1,
        "train.log_every": 1, "train.steps": 2, "eval.every": 2, "checkpoint.every": 2,
        "wandb.enabled": True}


@pytest.mark.slow
def test_sweep_run_on_bpe_data_logs_to_offline_wandb_and_samples(tmp_path, monkeypatch):
    """A sweep's run on a BPE-prepared folder with wandb offline: the ``.wandb`` file holds
    the sweep's group, the config and every metric of ``metrics.jsonl``; the model has the
    metadata's vocab and samples text through the folder's tokenizer."""
    pytest.importorskip("tokenizers")
    import numpy as np

    import sparsejax
    from sparsejax.downstream.generate import generate_ids
    from sparsejax.run import experiment, prepare, tokenizer
    from sparsejax.run.rundir import SweepDir
    from sparsejax.sweep.plan import plan

    for key, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)),
                       ("WANDB_SILENT", "true"), ("WANDB_DISABLE_GIT", "true"),
                       ("WANDB_API_KEY", ""), ("WANDB_BASE_URL", "http://127.0.0.1:9")):
        monkeypatch.setenv(key, value)  # offline, and any server it tried would not answer
    text = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(300))
    (tmp_path / "src.py").write_text(text)
    meta = prepare.prepare(str(tmp_path / "src.py"), "bpe:400", tmp_path / "data",
                           progress=False)
    sweep_dir = tmp_path / "my-sweep"
    (run,) = plan(str(ROOT / "configs" / "dense.py"), sweep_dir,
                  extra={**TINY, "data.source": str(tmp_path / "data")},
                  only="size-tiny_steps-300")
    assert run.spec.wandb.group == "my-sweep" and run.spec.wandb.mode == "offline"
    run_dir = SweepDir(sweep_dir).run(run.name).path
    experiment.run(run.spec, run_dir, progress=False)

    (file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    by_type: dict[str, list] = {}
    for r in records(file):
        by_type.setdefault(r.WhichOneof("record_type"), []).append(r)
    (start,) = by_type["run"]
    assert start.run.run_group == "my-sweep"
    assert start.run.run_id == (run_dir / "wandb_id").read_text().strip()
    config = {u.key: json.loads(u.value_json) for u in start.run.config.update}
    assert config["train"]["steps"] == 2 and config["wandb"]["group"] == "my-sweep"
    history = {}
    for r in by_type["history"]:
        row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        history[r.history.step.num] = row
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == sorted(history) == [1, 2]
    for m in logged:  # every metric of metrics.jsonl, with its value, at its step
        for key, value in m.items():
            if value is not None and isinstance(value, int | float):
                assert history[m["step"]][key] == pytest.approx(value, rel=1e-6), key
    assert "val_loss" in history[2] and "train_loss" in history[1]

    loaded = sparsejax.load(run_dir)
    assert loaded.model.cfg.vocab_size == meta["vocab_size"] > 256
    tok = tokenizer.load_file(tmp_path / "data" / "tokenizer.json")
    said = sparsejax.generate(loaded, "def f1", max_new_tokens=8, temperature=0.0)
    ids = generate_ids(loaded, tok.encode("def f1"), 8, 0.0)
    assert said == tok.decode(ids) and np.all(ids < meta["vocab_size"])
