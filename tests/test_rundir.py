"""The run directory has one owner: :mod:`sparsejax.run.rundir` spells every file name of a run
dir (and of a sweep or soup dir); no other module does. Plus what ``RunDir`` reads and writes:
committed checkpoint steps, the worker record, the status, unusable workdirs."""

from __future__ import annotations

import ast
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
        assert run.status() == RunStatus("running", 4, 3.5, 2.0)
        with pytest.raises(errors.RunDirBusyError, match=str(os.getpid())):
            rundir.RunLock(run).__enter__()
    assert run.status() == RunStatus("interrupted", 2, 3.5, 2.0)  # resumes from step 2
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
