"""Bad files and folders a user can meet (issue 24, "Unclear errors"): a read-only or
not-a-folder workdir; a corrupt or wrong-typed ``config.json``, ``summary.json``,
``sweep.json`` or ``metrics.jsonl``; an empty, header-only or BOM-prefixed CSV for ``fit``;
batches or a model too large for memory. Each is one ``sparsejax: error:`` line naming the
file or key and the fix, exit status 2, and nothing written.

The run and sweep dirs here are written by hand (what train writes, without training): every
refusal comes before anything is trained or loaded."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, one_error_line, tiny_config

from scaling import logs
from sparsejax.errors import ConfigError
from sparsejax.run import configlib, data, evaluation, memory
from sparsejax.run.rundir import RunDir, SweepDir

ROOT = Path(__file__).resolve().parents[1]
DENSE = ROOT / "configs" / "dense.py"
TRAIN = ["train", f"--config={DENSE}:{TINY}", "--config.train.steps=8", "--noprogress"]


def tree(path: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``path`` with its mode, size and mtime: equal before and after a
    refused command when it wrote nothing."""
    return {str(p): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in [path, *path.rglob("*")]}


def make_run(path: Path) -> RunDir:
    """A run dir as an interrupted 8-step tiny run leaves it (its files, no checkpoint)."""
    run = RunDir(path).create()
    run.write_config(configlib.validate(tiny_config()).to_dict())
    run.write_summary({"status": "interrupted", "step": 4, "steps": 8, "wall_time_s": 1.5})
    run.metrics_file.write_text("".join(json.dumps({"step": s, "train_loss": 5.0 - s / 4,
                                                    "wall_time_s": s / 4}) + "\n"
                                        for s in (2, 4)))
    run.checkpoints.mkdir()
    return run


MODEL = configlib.validate(tiny_config()).to_dict()["model"]
RUN_FILES = {  # (file, what it holds instead: text, None = a folder) -> words of the error
    ("config.json", "{"): ["is not valid JSON", "restore it"],
    ("config.json", "[1, 2]"): ["holds a JSON list, not an object", "restore it"],
    ("config.json", None): ["is a folder, not a file", "move it aside"],
    ("config.json", json.dumps({"model": MODEL, "train": 5})): [
        "train must be an object (a config section), got 5"],
    ("summary.json", '{"status": "compl'): ["is not valid JSON", "delete it"],
    ("summary.json", '"completed"'): ["holds a JSON str, not an object", "delete it"],
    ("summary.json", None): ["is a folder, not a file"],
    ("summary.json", '{"status": 5, "step": 8}'): ["'status' must be one of", "got 5",
                                                   "delete it"],
    ("summary.json", '{"status": "completed", "wall_time_s": "abc"}'): [
        "'wall_time_s' must be a number, got 'abc'"],
    ("summary.json", '{"status": "completed", "steps": "8"}'): ["'steps' must be an int"],
    ("metrics.jsonl", '[{"step": 2}, {"step": 4}]\n'): [
        "holds no record", "line 1 is a JSON list", "move it aside to start a new log"],
    ("metrics.jsonl", json.dumps({"step": 2}, indent=1) + "\n"): [
        "holds no record", "none of its 3 line(s)", "line 1 is not JSON"],
    ("metrics.jsonl", None): ["is a folder, not a file"],
}


def spoil(path: Path, text: str | None) -> None:
    path.unlink()
    if text is None:
        path.mkdir()
    else:
        path.write_text(text)


@pytest.mark.parametrize("name, text", list(RUN_FILES), ids=lambda v: str(v)[:16])
def test_a_bad_run_file_is_one_line_naming_it_for_train_and_status(capsys, tmp_path, name,
                                                                      text):
    run = make_run(tmp_path / "run")
    spoil(run.path / name, text)
    before = tree(tmp_path)
    commands = [[*TRAIN, f"--workdir={run}"]]
    if name != RunDir.CONFIG:  # status reads the summary and the metrics, not the config
        commands.append(["status", str(run)])
    for argv in commands:
        line = one_error_line(capsys, argv)
        assert str(run.path / name) in line, line
        for words in RUN_FILES[name, text]:
            assert words in line, line
    assert tree(tmp_path) == before  # nothing written: no lock, no summary, no log line


@pytest.mark.parametrize("text, words", [
    ("[1]", "holds a JSON list, not an object"),
    ('{"runs": 5}', "'runs' must be a list of run entries, got 5"),
    ('{"runs": [{"name": 3}]}', "runs[0] must be an object with a string 'name'"),
    ('{"runs": [{"name": "a", "status": 3}]}', "'status' must be a string, got 3"),
    (None, "is a folder, not a file"),
])
def test_a_bad_sweep_json_is_one_line_naming_it_for_status_and_sweep(capsys, tmp_path, text,
                                                                    words):
    sweep = SweepDir(tmp_path / "sweep").create()
    make_run(sweep.path / "a")
    sweep.write_sweep({"recipe": str(DENSE), "runs": [{"name": "a", "status": "interrupted"}]})
    spoil(sweep.sweep_file, text)
    before = tree(tmp_path)
    for argv in (["status", str(sweep)], ["sweep", f"--config={DENSE}", f"--workdir={sweep}"]):
        line = one_error_line(capsys, argv)
        assert str(sweep.sweep_file) in line and words in line and "delete it" in line \
            or text is None and words in line, line
    assert tree(tmp_path) == before


def test_a_sweep_relaunch_reads_its_runs_files_before_anything_runs(capsys, tmp_path):
    run = make_run(tmp_path / "sweep" / "size-tiny_steps-300")
    spoil(run.summary_file, '{"status": "running", "step": "four"}')
    before = tree(tmp_path)
    line = one_error_line(capsys, ["sweep", f"--config={DENSE}", f"--workdir={tmp_path / 'sweep'}",
                                   "--only", "size-tiny_steps-300"])
    assert f"{run.summary_file}: 'step' must be an int, got 'four'" in line, line
    assert tree(tmp_path) == before


def test_an_unreadable_line_among_records_still_warns_and_keeps_the_rest(tmp_path):
    """Item 2 stays: only a file with no record at all is refused."""
    run = make_run(tmp_path / "run")
    with run.metrics_file.open("a") as f:
        f.write('{"step": 5, "train_loss": "x"}\n[6]\n' + json.dumps({"step": 6}) + "\n")
    with pytest.warns(UserWarning) as caught:
        assert [r["step"] for r in run.read_metrics()] == [2, 4, 6]
    assert [str(w.message).split(": ")[0] for w in caught] == [f"{run.metrics_file}:3",
                                                               f"{run.metrics_file}:4"]


# ----------------------------------------------------------------- the workdir's folder itself
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


@contextlib.contextmanager
def as_ordinary_user():
    """This thread without root's override of file permissions (``CAP_DAC_OVERRIDE``, dropped
    from the effective set and restored after), so a read-only folder is read-only to it as to
    any user; nothing to do for a process that is not root."""
    if os.geteuid() != 0:
        yield
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, caps = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if not hasattr(libc, "capget") or libc.capget(ctypes.byref(header), caps) != 0:
        pytest.skip("root without capget: cannot make a folder read-only to this process")
    saved = caps[0].effective
    caps[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
    assert libc.capset(ctypes.byref(header), caps) == 0, ctypes.get_errno()
    try:
        yield
    finally:
        caps[0].effective = saved
        assert libc.capset(ctypes.byref(header), caps) == 0, ctypes.get_errno()


@pytest.mark.parametrize("case", ["read-only workdir", "read-only parent", "read-only log",
                                  "read-only sweep parent", "a file as parent"])
def test_a_workdir_that_cannot_be_written_is_refused_before_anything_is_written(
        capsys, tmp_path, case):
    parent = tmp_path / "parent"
    parent.mkdir()
    workdir, argv = parent / "run", TRAIN
    if case == "read-only workdir":
        workdir.mkdir()
        locked, words = workdir, "it is read-only"
    elif case == "read-only parent":
        locked, words = parent, f"{parent} is read-only"
    elif case == "read-only log":
        locked = make_run(workdir).metrics_file
        words = f"{locked} is read-only"
    elif case == "read-only sweep parent":
        argv, locked = ["sweep", f"--config={DENSE}"], parent
        words = f"cannot be written as a sweep dir: {parent} is read-only"
    else:
        (tmp_path / "file").write_text("")
        workdir, locked, words = tmp_path / "file" / "run", None, "file is not a folder"
    before = tree(tmp_path)
    if locked is not None:
        locked.chmod(0o555 if locked.is_dir() else 0o444)
    try:
        with as_ordinary_user():
            line = one_error_line(capsys, [*argv, f"--workdir={workdir}"])
    finally:
        if locked is not None:
            locked.chmod(0o755 if locked.is_dir() else 0o644)
    assert str(workdir) in line and words in line, line
    if locked is not None:
        assert f"chmod u+w {locked}" in line and "or use another --workdir" in line
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------- fit FILE.csv
def test_an_empty_or_header_only_csv_is_one_line_naming_the_file(tmp_path, capsys):
    from scaling.cli import main as fit

    for name, text, words in [
        ("empty.csv", "", "is empty (no header row); it needs a header row (N,D,loss"),
        ("blank.csv", "\n\n", "is empty (no header row)"),
        ("header.csv", "N,D,loss\n", "has a header (N,D,loss) but no rows; add one row per run"),
        ("latin1.csv", "N,D,loss\n1e6,1e9,2.5\xe9\n", "is not a UTF-8 CSV file"),
    ]:
        path = tmp_path / name
        path.write_bytes(text.encode("latin-1"))
        assert fit([str(path), "--out", str(tmp_path / "fit")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"sparsejax: error: {path} {words}" or (
            err.startswith(f"sparsejax: error: {path} ") and words in err), err
    assert not (tmp_path / "fit").exists()


def test_a_csv_with_a_byte_order_mark_reads_as_without(tmp_path, reference_data):
    text = (reference_data / "chinchilla_svg_extracted.csv").read_text()
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_text(text, encoding="utf-8")
    bom.write_text(text, encoding="utf-8-sig")  # what spreadsheet programs write
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    a, b = logs.from_csv(plain, min_points=1), logs.from_csv(bom, min_points=1)
    assert a.n_key == b.n_key == "N" and len(a.N) > 5
    for x, y in zip(a[:3], b[:3], strict=True):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------- memory
def spec_of(**overrides):
    return configlib.validate(tiny_config(**overrides))


def test_host_batches_by_hand_and_against_the_pipelines_arrays():
    """tiny: train 4 windows, eval 4 x 1 (the final set is the same), seq_len 32."""
    spec = spec_of()
    got = memory.host_batches(spec)
    assert [b for _, _, b in got.parts] == [8 * 4 * 32, 8 * 4 * 32]
    assert got.peak == 8 * 4 * 32 * 2 + 12 * 4 * 33
    # what the pipeline holds is what its arrays hold
    tokens = np.arange(5000, dtype=np.uint8)
    x, y = data.get_batch(tokens, seed=0, step=0, batch_size=4, seq_len=32)
    ev = evaluation.eval_set(tokens, batch_size=4, seq_len=32, n_batches=1, seed=0)
    assert x.nbytes + y.nbytes == got.parts[0][2]
    assert ev.xs.nbytes + ev.ys.nbytes == got.parts[1][2]
    # drawing a batch takes at most what the estimate says: numpy's allocations measured
    # (4096 windows: tracemalloc's own few tens of KB are under 2%; the current pipeline
    # takes all of it)
    spec = spec_of(train__batch_size=4096)
    tracemalloc.start()
    data.get_batch(tokens, seed=0, step=0, batch_size=4096, seq_len=32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    want = memory.host_batches(spec).parts[0][2] + memory.DRAW_BYTES_PER_TOKEN * 4096 * 33
    assert memory.host_batches(spec).parts[0][2] < peak <= 1.02 * want, (peak, want)


def test_host_batches_refused_at_one_byte_short_naming_the_largest_part():
    spec = spec_of(eval__final_batches=50)  # the final set: 4 x 50 windows, the largest part
    need = memory.host_batches(spec)
    assert len(need.parts) == 3 and need.parts[2][2] == 8 * 4 * 50 * 32
    assert need.peak == 8 * 32 * (4 + 4 + 200) + 12 * 200 * 33
    assert memory.check_host_batches(spec, available=(need.peak, "test memory")) == need
    with pytest.raises(ConfigError, match=r"need about 0\.1 MB of host memory .* than the "
                       r"0\.1 MB of test memory: the final evaluation set \(eval\.batch_size=4 "
                       r"x eval\.final_batches=50 x train\.seq_len=32 tokens\) holds 0\.1 MB; "
                       r"lower eval\.batch_size, eval\.final_batches or train\.seq_len"):
        memory.check_host_batches(spec, available=(need.peak - 1, "test memory"))


def test_available_host_memory_is_positive_and_at_most_physical():
    free, what = memory.available_host_memory()
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert "host memory" in what


@pytest.mark.parametrize("override, words", [
    # 10**8 windows of 4096 tokens: 3.3 TB held; no host has that free
    (["--config.train.batch_size=100000000", "--config.model.n_ctx=4096",
      "--config.train.seq_len=4096"], "the train batch (train.batch_size=100000000"),
    (["--config.eval.batch_size=100000000", "--config.eval.batches=1000"],
     "the evaluation set (eval.batch_size=100000000 x eval.batches=1000"),
])
def test_batches_the_host_cannot_hold_are_refused_before_any_allocation(capsys, tmp_path,
                                                                         override, words):
    line = one_error_line(capsys, [*TRAIN, f"--workdir={tmp_path / 'run'}", *override])
    assert "of host memory" in line and words in line, line
    assert not (tmp_path / "run").exists()


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(capsys, tmp_path):
    """~10**11 parameters (0.4 TB in float32): refused by its parameters alone, before the
    train step is traced (whose counts would overflow int32)."""
    line = one_error_line(capsys, [*TRAIN, f"--workdir={tmp_path / 'run'}",
                                   "--config.model.size=8,32768,64,131072"])
    assert "its parameters alone" in line and "per device" in line, line
    assert line.endswith("lower it with model.size, mesh.fsdp (sparsejax plan-memory shows "
                         "the parts)"), line
    assert not (tmp_path / "run").exists()


def test_params_bytes_by_hand():
    """tiny (2 blocks, d 64, ff 256, LayerNorms and biases, tied embeddings) on vocab 256:
    116480 float32 parameters, the n_params a trained tiny run reports; nothing built."""
    d, ff, vocab = 64, 256, 256
    block = 4 * (d * d + d) + 2 * 2 * d + (d * ff + ff) + (ff * d + d)
    n = 2 * block + vocab * d + 2 * d
    assert n == 116480
    assert memory.params_bytes(spec_of(), vocab) == 4 * n
    # model.dtype is the compute dtype: the parameters stay float32
    assert memory.params_bytes(spec_of(model__dtype="bfloat16"), vocab) == 4 * n
