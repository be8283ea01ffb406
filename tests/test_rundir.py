"""The run directory has one owner: :mod:`sparsejax.run.rundir` spells every file name of a run
dir (and of a sweep or soup dir); no other module does. Plus what ``RunDir`` reads and writes:
committed checkpoint steps, the worker record, the status, unusable workdirs."""

from __future__ import annotations

import ast
import io
import json
import os
from pathlib import Path

import pytest

from sparsejax import errors
from sparsejax.run import rundir
from sparsejax.run.rundir import RunDir, RunStatus, SweepDir, WorkerRecord

ROOT = Path(__file__).resolve().parents[1]
OWNER = ROOT / "sparsejax" / "run" / "rundir.py"
PENDING: set = set()  # modules that may still spell run-dir names: none
# the contract (README, docs/design.md "Run directory", scaling.logs): these names must not change
CONTRACT = {"config.json", "metrics.jsonl", "summary.json", "worker.json", "worker.log", "lock",
            "checkpoints", "damaged_checkpoints", "wandb_id", "oneshot.json", "oneshot.png",
            "export", "sweep.json", "soup.json"}
NAMES = set(RunDir.NAMES) | set(SweepDir.NAMES)


def test_the_names_are_the_contract():
    assert NAMES == CONTRACT


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def spellings(source: str) -> list[tuple[int, str]]:
    """Where code (docstrings aside) spells a run-dir file name: any string holding a dotted
    name (``"summary.json"``, ``f"see sweep.json"``), and a bare name (``"lock"``,
    ``"checkpoints"``) joined to a path (``x / "lock"``) or bound to a constant."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    dotted = {n for n in NAMES if "." in n}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            found += [(node.lineno, n) for n in dotted if n in node.value]
        parts = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [node.left, node.right]
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            parts = [node.value]
        found += [(node.lineno, p.value) for p in parts
                  if isinstance(p, ast.Constant) and p.value in NAMES]
    return sorted(set(found))


def test_the_check_sees_each_way_of_spelling_a_name():
    code = ('"""Writes summary.json."""\n'  # a docstring documents the name: allowed
            'a = run / "summary.json"\n'
            'b = f"see {x} and sweep.json"\n'
            'LOCK_FILE = "lock"\n'
            'c = path / "checkpoints" / str(step)\n'
            'd = {"status": "export"}\n')  # "export" as a value, not a path: allowed
    assert spellings(code) == [(2, "summary.json"), (3, "sweep.json"), (4, "lock"),
                               (5, "checkpoints")]


def test_no_module_but_rundir_spells_a_run_dir_file_name():
    offenders = []
    for path in sorted((ROOT / "sparsejax").rglob("*.py")):
        if path == OWNER or path in PENDING:
            continue
        offenders += [f"{path.relative_to(ROOT)}:{line}: {name!r}"
                      for line, name in spellings(path.read_text())]
    assert not offenders, "ask sparsejax.run.rundir.RunDir / SweepDir instead:\n" + "\n".join(
        offenders)


def test_checkpoint_steps_are_the_committed_step_folders(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.checkpoint_steps() == [] and run.latest_checkpoint_step() is None
    for name in ("2", "10", "12.orbax-checkpoint-tmp-1712345678", "notes"):
        (run.checkpoints / name).mkdir(parents=True)
    (run.checkpoints / "14").write_text("")  # a file, not a step folder
    assert run.checkpoint_steps() == [2, 10] and run.latest_checkpoint_step() == 10


def test_worker_record_round_trip_and_reason(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_worker() is None
    record = WorkerRecord(exit=2, wall_s=1.5, cpu_s=1.0, cores=[0, 1], pid=7,
                          error_type="ConfigError", error="config train.lr: must be > 0")
    run.write_worker(record)
    assert run.read_worker() == record
    assert record.reason() == "ConfigError: config train.lr: must be > 0"
    assert WorkerRecord(exit=0).reason() is None
    run.clear_worker()
    assert run.read_worker() is None


def test_status_reads_interrupted_once_the_trainer_is_gone(tmp_path):
    run = RunDir(tmp_path)
    assert run.status() == RunStatus("unknown", None, None, None)
    run.write_summary({"status": "running", "step": 0})
    log = run.metrics_log(resume_step=0)
    log.write({"step": 4, "train_loss": 3.5, "wall_time_s": 2.0})
    log.close()
    (run.checkpoints / "2").mkdir(parents=True)
    with run.lock():  # the trainer (this process) is alive: its latest logged step
        assert run.lock_owner() == os.getpid()
        assert run.status() == RunStatus("running", 4, 3.5, 2.0, checkpoint=2)
        with pytest.raises(errors.RunDirBusyError, match=str(os.getpid())):
            rundir.RunLock(run).__enter__()
    # the loss beside the step it was logged at (4), the resume's step apart (2)
    assert run.status() == RunStatus("interrupted", 4, 3.5, 2.0, checkpoint=2)
    assert rundir.run_status(tmp_path) == run.status()
    assert rundir.RunDirBusyError is errors.RunDirBusyError


def test_a_file_cannot_be_a_run_or_sweep_dir(tmp_path):
    (tmp_path / "f").write_text("")
    for folder in (RunDir(tmp_path / "f"), SweepDir(tmp_path / "f" / "sub")):
        with pytest.raises(errors.InputError, match=f"{folder} cannot be a .*: .*not a folder"):
            folder.create()
    assert RunDir(tmp_path / "new" / "run").create().path.is_dir()


def test_a_torn_json_file_is_an_input_error_naming_it(tmp_path):
    run = RunDir(tmp_path)
    run.summary_file.write_text('{"status": "compl')
    with pytest.raises(errors.InputError, match=f"{run.summary_file} is not valid JSON"):
        run.read_summary()
    run.config_file.write_text("[1, 2]")
    with pytest.raises(errors.InputError, match="not an object"):
        run.read_config()


# ----------------------------------------------------------------- metrics.jsonl: append-only
def _write_lines(run: RunDir, lines: list[str]) -> None:
    run.metrics_file.write_text("".join(line + "\n" for line in lines))


def _rec(step: int, loss: float = 1.0) -> str:
    return json.dumps({"step": step, "train_loss": loss})


def test_a_bad_metrics_line_is_skipped_with_a_warning_and_later_records_kept(tmp_path):
    run = RunDir(tmp_path)
    _write_lines(run, [_rec(2), _rec(4), '{"step": 5, "train_lo', _rec(6), _rec(8)])
    before = run.metrics_file.read_bytes()
    with pytest.warns(UserWarning, match=f"{run.metrics_file}:3: unreadable"):
        assert [r["step"] for r in run.read_metrics()] == [2, 4, 6, 8]
    with pytest.warns(UserWarning, match=f"{run.metrics_file}:3"):
        log = run.metrics_log(resume_step=8)  # the resume that once kept 2 of 8 records
    log.close()
    assert run.metrics_file.read_bytes() == before  # nothing rewritten
    with pytest.warns(UserWarning, match=f"{run.metrics_file}:3"):
        assert [r["step"] for r in run.read_metrics()] == [2, 4, 6, 8]
        assert run.last_logged_step() == 8


def test_resuming_supersedes_later_records_without_truncating_the_file(tmp_path):
    run = RunDir(tmp_path)
    _write_lines(run, [_rec(s, 9.0) for s in (2, 4, 6, 8)])
    before = run.metrics_file.read_bytes()
    log = run.metrics_log(resume_step=4)  # the checkpoint it resumes from: step 4
    assert [r["step"] for r in run.read_metrics()] == [2, 4]  # none past the checkpoint
    assert run.last_logged_step() == 4
    log.write({"step": 6, "train_loss": 1.0})
    log.close()
    assert run.metrics_file.read_bytes().startswith(before)  # append-only
    assert [(r["step"], r["train_loss"]) for r in run.read_metrics()] == [
        (2, 9.0), (4, 9.0), (6, 1.0)]
    assert run.last_logged_step() == 6
    run.metrics_log(resume_step=0).close()  # restarted from scratch: no record survives
    assert run.read_metrics() == [] and run.last_logged_step() == 0


def test_a_torn_last_metrics_line_is_cut_before_appending(tmp_path):
    run = RunDir(tmp_path)
    run.metrics_file.write_text(_rec(2) + "\n" + _rec(4)[:9])  # killed mid-write
    assert [r["step"] for r in run.read_metrics()] == [2]  # a torn tail: no warning
    with pytest.warns(UserWarning, match=f"{run.metrics_file}: cut a torn last line"):
        log = run.metrics_log(resume_step=2)
    log.write({"step": 4, "train_loss": 1.0})
    log.close()
    assert [r["step"] for r in run.read_metrics()] == [2, 4]
    run.metrics_file.write_text(_rec(2) + "\n" + _rec(4))  # complete, its newline missing
    run.metrics_log(resume_step=4).close()
    assert run.metrics_file.read_text() == _rec(2) + "\n" + _rec(4) + "\n"


# ----------------------------------------------------------------- planted symlinks
def test_the_lock_does_not_follow_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run = RunDir(tmp_path / "run").create()
    run.lock_file.symlink_to(victim)
    with pytest.raises(errors.InputError, match=f"{run.lock_file} is a symbolic link"):
        run.lock().__enter__()
    assert victim.read_text() == "precious\n"
    assert run.lock_owner() is None  # a link is no lock: not read through either


@pytest.mark.parametrize("at", ["temp", "target"])
def test_atomic_writes_do_not_follow_planted_symlinks(tmp_path, at):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run = RunDir(tmp_path / "run").create()
    link = run.summary_file if at == "target" else run.path / (RunDir.SUMMARY + ".tmp")
    link.symlink_to(victim)
    run.write_summary({"status": "running"})
    assert victim.read_text() == "precious\n"
    assert run.read_summary() == {"status": "running"}
    assert not run.summary_file.is_symlink()
    assert sorted(p.name for p in run.path.iterdir()) == sorted(
        [RunDir.SUMMARY] + ([link.name] if at == "temp" else []))  # no temp file left
    assert (run.summary_file.stat().st_mode & 0o777) == 0o666 & ~_umask()


def test_the_metrics_log_does_not_follow_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run = RunDir(tmp_path / "run").create()
    run.metrics_file.symlink_to(victim)
    with pytest.raises(errors.InputError, match=f"{run.metrics_file} is a symbolic link"):
        run.metrics_log(resume_step=0)
    assert victim.read_text() == "precious\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------- progress off a terminal
def test_progress_prints_a_plain_line_per_log_step_when_not_a_terminal():
    stream = io.StringIO()  # a log file, a pipe, a cluster job's output
    bar = rundir.Progress(10, initial=2, stream=stream)
    bar.update(4, loss=3.25, val=None, sparsity=0.5)
    bar.update(6, loss=3.0)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 4/10 (40%) loss=3.25 sparsity=0.5 |")
    assert "elapsed, ETA " in lines[1]
    quiet = io.StringIO()
    rundir.Progress(10, stream=quiet, enabled=False).update(4, loss=1.0)  # --noprogress
    assert quiet.getvalue() == ""
