"""Sweeps: one process per run, --parallel, --only, failures, resume, config changes, sweep.json.

One sweep dir goes through a realistic life in ``test_sweep_life``: a first launch of two runs
in parallel (``--only``), a run left partial by an interruption, a relaunch where a run fails
while the partial one resumes, a fully skipped relaunch and a relaunch with a changed override.
Everything else here is cheap (no training).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, tiny_config

from sparsejax import cli, sweep
from sparsejax.run import configlib, data, experiment
from sparsejax.run.rundir import RunDir
from sparsejax.sweep import launcher
from sparsejax.sweep.plan import Run

RECIPE = '''
from sparsejax.run import configlib

def get_config(arg=None):
    c = configlib.apply_arg(configlib.base(), TINY_ARG)  # tests/conftest.py's
    c.train.steps = 4
    c.eval.every = 4
    c.eval.final_batches = 2
    return configlib.apply_arg(c, arg)

def sweep(add):
    for seed in (0, 1, 2):
        add(seed=seed)
    add(**{"data.source": "/nonexistent/corpus.txt"})
'''
RECIPE = RECIPE.replace("TINY_ARG", repr(TINY))
SEEDS = ["seed-0", "seed-1"]
PARTIAL = "seed-2"
BAD = "source-nonexistentcorpus.txt"


def _sweep(recipe: Path, out: Path, *args: str) -> int:
    return cli.main(["sweep", "--config", f"{recipe}:size=tiny", "--workdir", str(out),
                     "--config.train.warmup_steps=2", *args])


def _entries(out: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((out / "sweep.json").read_text())["runs"]}


def _interrupt_at(step_to_stop: int, monkeypatch) -> None:
    """Make the training loop raise KeyboardInterrupt when it asks for this step's batch (what
    Ctrl-C or a killed sweep does to a run: it keeps its checkpoints)."""
    real = data.get_batch

    def get_batch(tokens, *, step, **kw):
        if step == step_to_stop:
            raise KeyboardInterrupt
        return real(tokens, step=step, **kw)

    monkeypatch.setattr(data, "get_batch", get_batch)


@pytest.mark.slow
def test_sweep_life(tmp_path: Path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE)
    out = tmp_path / "sweep"
    spec, extra = f"{recipe}:size=tiny", {"train.warmup_steps": 2}

    # 1. a run left partial: interrupted after its checkpoint at step 2 (what Ctrl-C or a
    # killed sweep leaves). In this process first: its compile fills the persistent cache
    # (conftest) that the workers below read.
    (run,) = sweep.plan(spec, out, extra=extra, only=PARTIAL)
    assert run.spec.wandb.group == "sweep"  # the sweep dir's name, for every run
    _interrupt_at(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(run.spec, str(out / PARTIAL), progress=False)
    monkeypatch.undo()
    assert json.loads((out / PARTIAL / "summary.json").read_text())["status"] == "interrupted"

    # 2. --only + --parallel 2: the two other seed runs at once, each in its own process
    assert _sweep(recipe, out, "--only", "seed-[01]", "--parallel", "2") == 0
    err = capsys.readouterr().err
    assert "done seed-0 loss=" in err and "done seed-1 loss=" in err and "ETA" in err
    entries = _entries(out)
    assert sorted(entries) == SEEDS  # nothing else planned or run
    assert not (out / BAD).exists()
    spans = []
    for name in SEEDS:
        e, s = entries[name], json.loads((out / name / "summary.json").read_text())
        assert e["status"] == s["status"] == "completed" and s["step"] == 4
        assert e["final_val_loss"] == s["val_loss"] == s["final_val_loss"]
        assert e["val_loss_se"] == s["val_loss_se"] > 0 and e["wall_time_s"] > 0
        assert e["overrides"] == {"seed": int(name[-1]), "train.warmup_steps": 2}
        config = json.loads((out / name / "config.json").read_text())
        assert config["wandb"]["group"] == "sweep"
        assert config["train"]["warmup_steps"] == 2  # the command line's override
        spans.append(((out / name / "config.json").stat().st_mtime,
                      (out / name / "summary.json").stat().st_mtime))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1  # they trained at the same time

    # the same evaluation tokens whatever the run's seed, and they are the documented ones
    s0, s1 = (json.loads((out / n / "summary.json").read_text()) for n in SEEDS)
    assert s0["train_loss"] != s1["train_loss"]  # the seeds did differ
    val = data.load_corpus().val
    batches = data.eval_batches(val, batch_size=4, seq_len=32, n_batches=2, seed=0)
    xs = np.stack([b[0] for b in batches]).astype(np.int32)
    ys = np.stack([b[1] for b in batches]).astype(np.int32)
    h = hashlib.sha256(repr(xs.shape).encode())
    h.update(xs.tobytes())
    h.update(ys.tobytes())
    assert s0["eval_sha256"] == s1["eval_sha256"] == h.hexdigest()[:16]
    assert s0["eval_sequences"] == s1["eval_sequences"] == 8

    assert _sweep(recipe, out, "--dry-run") == 0
    rows = {r.split()[0]: r.split()[1:] for r in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {"seed-0": ["skip", "4", "4"], "seed-1": ["skip", "4", "4"],
                    PARTIAL: ["resume", "2", "4"], BAD: ["run", "0", "4"]}

    # 3. relaunch: completed runs untouched, the partial one resumes, the bad one fails alone
    before = {n: (out / n / "summary.json").read_bytes() for n in SEEDS}
    assert _sweep(recipe, out, "--parallel", "2", "--noprogress") == 1
    captured = capsys.readouterr()
    assert {n: (out / n / "summary.json").read_bytes() for n in SEEDS} == before
    resumed = json.loads((out / PARTIAL / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_from"] == 2
    entries = _entries(out)
    assert entries[BAD]["status"] == "failed" and "corpus.txt" in entries[BAD]["reason"]
    assert entries[PARTIAL]["status"] == "completed" and entries[PARTIAL]["action"] == "resume"
    assert f"failed {BAD}" in captured.err and "no such file or folder" in captured.err
    assert f"done {PARTIAL} loss=" in captured.err and "did not complete" in captured.err
    assert "ETA" not in captured.err  # --noprogress: the run lines only

    # 4. a fully skipped relaunch keeps every entry (statuses, losses, wall times, reasons)
    full = _entries(out)
    assert _sweep(recipe, out, "--only", "seed-0,seed-1") == 0
    after = _entries(out)
    assert sorted(after) == sorted([*SEEDS, PARTIAL, BAD])
    keep = ("status", "final_val_loss", "val_loss_se", "wall_time_s", "overrides", "reason")
    for name in after:
        assert {k: after[name].get(k) for k in keep} == {k: full[name].get(k) for k in keep}
    assert [after[n]["action"] for n in SEEDS] == ["skip", "skip"]

    # `status` reads the sweep dir the workers wrote, and sweep.json for the run that failed
    # before it wrote a summary
    capsys.readouterr()
    assert cli.main(["status", str(out)]) == 0
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(rows) == sorted([[n, "completed", "4"] for n in [*SEEDS, PARTIAL]]
                                  + [[BAD, "failed", "-"]])

    # 5. a changed override on relaunch: an error naming the runs and the key, nothing runs
    assert _sweep(recipe, out, "--config.train.lr=0.001") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsejax: error:") and "\n" not in err
    assert all(n in err for n in [*SEEDS, PARTIAL]) and "train.lr: 0.003 -> 0.001" in err
    assert _entries(out) == after


def test_sweep_errors(tmp_path: Path, capsys):
    recipe = tmp_path / "bad.py"
    recipe.write_text(RECIPE.replace('"data.source"', '"data.sourc"'))
    with pytest.raises(ValueError, match="unknown config key"):
        sweep.configs(str(recipe))
    with pytest.raises(ValueError, match="does not exist"):
        sweep.configs(str(tmp_path / "missing.py"))
    assert sweep.run_name({"model.size": "XS", "sparsity.final": 0.5}) == "size-XS_final-0.5"
    good = tmp_path / "good.py"
    good.write_text(RECIPE)
    with pytest.raises(ValueError, match=r"--only 'nope\*' matches no run.*seed-0"):
        sweep.plan(str(good), tmp_path / "s", only="nope*")
    argv = ["sweep", "--config", str(good), "--workdir", str(tmp_path / "s")]
    for bad, says in ((["--parallel", "0"], "--parallel must be an int >= 1"),
                      (["--parallel", "x"], "--parallel")):
        assert cli.main([*argv, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sparsejax: error:") and says in err and "\n" not in err


def test_sweep_overrides_use_the_config_syntax(tmp_path: Path, capsys):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE)
    argv = ["sweep", "--config", str(recipe), "--workdir", str(tmp_path / "s"), "--dry-run"]
    assert cli.main([*argv, "--config.train.steps=5", "--only", "seed-0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split() for line in out[1:]] == [["seed-0", "run", "0", "5"]]
    assert not (tmp_path / "s").exists()
    for bad, key in (("--config.train.stepz=5", "train.stepz"), ("--set", "--set"),
                     ("--config.train.lr=-1.0", "train.lr")):
        assert cli.main([*argv, bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sparsejax: error:") and key in err and "\n" not in err
    # the command line's value applies to every run, after the run's own overrides
    runs = sweep.configs(str(recipe), {"train.steps": 9})
    assert [c.train.steps for _, _, c in runs] == [9, 9, 9, 9]


@pytest.mark.slow
def test_worker_records_its_failure_and_the_sweep_reports_it(tmp_path: Path, capsys):
    """A real worker process whose run fails on its config (data.source names no file): its
    worker.json records the error's type, message and exit status (2: the user's input), and
    sweep.json's reason, the finish line and the summary are read from it."""
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE)
    out = tmp_path / "sweep"
    assert _sweep(recipe, out, "--only", BAD, "--noprogress") == 1
    err = capsys.readouterr().err
    record = RunDir(out / BAD).read_worker()
    message = "source: no such file or folder: '/nonexistent/corpus.txt'"
    assert (record.exit, record.error_type, record.error) == (2, "CorpusNotFoundError", message)
    assert record.wall_s > 0 and record.cpu_s > 0
    (entry,) = _entries(out).values()
    assert entry["status"] == "failed"
    assert entry["reason"] == f"CorpusNotFoundError: {message}" == record.reason()
    assert f"failed {BAD} in" in err and entry["reason"] in err and "did not complete" in err


def test_core_slots_and_worker_env():
    assert sweep.core_slots(1, [0, 1]) == [[0, 1]]
    assert sweep.core_slots(2, [0, 1]) == [[0], [1]]
    assert sweep.core_slots(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert sweep.core_slots(3, [4, 5]) == [[4], [5], [4]]
    with pytest.raises(ValueError, match="--parallel"):
        sweep.core_slots(0, [0])
    env = sweep.worker_env(1, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert all(env[k] == "1" for k in sweep.THREAD_ENV)
    # XLA_FLAGS is part of the compilation cache's key: left as it is (the affinity bounds XLA)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    root = str(Path(sweep.__file__).resolve().parents[2])
    assert env["PYTHONPATH"].split(os.pathsep)[0] == root
    env = sweep.worker_env(None, {})
    assert not any(k in env for k in sweep.THREAD_ENV) and "XLA_FLAGS" not in env
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env
    assert sweep.worker_env(1, {}, parallel=3)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.300"


def test_config_differences_ignore_logging_keys():
    old = configlib.base().to_dict()
    new = configlib.base()
    new.wandb.group = "other"
    new.train.lr = 1e-3
    new.eval.final_batches = 7
    assert configlib.differing_keys(old, new.to_dict()) == ["eval.final_batches", "train.lr"]
    del old["eval"]["seed"]  # a run dir written before the key existed
    assert "eval.seed" in configlib.differing_keys(old, configlib.base().to_dict())
    # a key whose missing value reproduces the old runs (ADDED_KEYS) is not a difference ...
    del old["data"]["vocab_size"]
    assert "data.vocab_size" not in configlib.differing_keys(old, configlib.base().to_dict())
    changed = configlib.base()
    changed.data.vocab_size = 300  # ... unless the new config sets another value
    assert "data.vocab_size" in configlib.differing_keys(old, changed.to_dict())
    del old["sparsity"]["acdc"]  # a whole section added later reads as its defaults too
    assert configlib.differing_keys(old, configlib.base().to_dict()) == ["eval.seed"]


RELAUNCH = RECIPE.replace("for seed in (0, 1, 2):", "for seed in range(7):").replace(
    '    add(**{"data.source": "/nonexistent/corpus.txt"})\n', "")


def _hand_run(root: Path, name: str, config: dict, summary: dict | None,
              checkpoints: tuple[str, ...] = ()) -> None:
    """A run dir written by hand: config.json, summary.json and empty checkpoint folders."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    for step in checkpoints:
        (run / "checkpoints" / step).mkdir(parents=True)


def test_relaunch_plan_skips_finished_runs_and_reruns_the_others(tmp_path: Path):
    """``sweep.plan`` on hand-written run dirs (no training): a completed and a diverged run
    are skipped (``FINISHED``: rerunning gives the same result); a failed or interrupted run
    resumes from its latest committed checkpoint, or starts over without one; a ``running``
    run whose process is gone resumes; a run with no dir runs. A run dir whose config differs
    is an error naming the run and the key."""
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RELAUNCH)
    out = tmp_path / "sweep"
    first = sweep.plan(str(recipe), out)
    assert [(r.name, r.action, r.done_steps) for r in first] == [
        (f"seed-{i}", "run", 0) for i in range(7)]
    assert not out.exists()  # planning writes nothing
    config = {r.name: json.loads(json.dumps(r.spec.to_dict())) for r in first}
    steps = first[0].spec.train.steps
    assert steps == 4
    done = {"steps": steps, "step": steps, "val_loss": 2.5}
    _hand_run(out, "seed-0", config["seed-0"], {"status": "completed", **done}, ("2", "4"))
    _hand_run(out, "seed-1", config["seed-1"], {"status": "diverged", "diverged_step": 2,
                                                 "steps": steps, "step": 2,
                                                 "train_loss": "nan"}, ("2",))
    _hand_run(out, "seed-2", config["seed-2"], {"status": "failed", "steps": steps, "step": 3},
              ("2",))
    _hand_run(out, "seed-3", config["seed-3"], {"status": "interrupted", "steps": steps,
                                                 "step": 2},
              ("2", "4.orbax-checkpoint-tmp-1700000000"))  # step 4 never committed
    _hand_run(out, "seed-4", config["seed-4"], {"status": "failed", "steps": steps, "step": 0})
    _hand_run(out, "seed-5", config["seed-5"], {"status": "running", "steps": steps,
                                                 "step": 3}, ("2",))  # no lock: process gone
    # seed-6: no run dir at all
    planned = {r.name: (r.action, r.done_steps) for r in sweep.plan(str(recipe), out)}
    assert planned == {
        "seed-0": ("skip", 4),     # completed
        "seed-1": ("skip", 4),     # diverged: the same config diverges again
        "seed-2": ("resume", 2),   # failed after a checkpoint
        "seed-3": ("resume", 2),   # interrupted: the last committed checkpoint
        "seed-4": ("run", 0),      # failed before any checkpoint
        "seed-5": ("resume", 2),   # running, its process gone
        "seed-6": ("run", 0),      # never started
    }
    changed = dict(config["seed-1"], train={**config["seed-1"]["train"], "lr": 0.5})
    (out / "seed-1" / "config.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match=r"1 run\(s\) differs.*seed-1 \(train.lr: 0.5 -> "):
        sweep.plan(str(recipe), out)


def test_sweep_progress_prints_a_plain_line_when_a_run_logs_and_not_a_terminal(tmp_path):
    spec = configlib.validate(tiny_config())
    runs = [Run(f"r{i}", {}, spec, "run", 0, 100.0) for i in range(2)]
    stream = io.StringIO()
    bar = launcher.Progress(runs, stream, enabled=True)
    run = RunDir(tmp_path / "r0").create()
    log = run.metrics_log(resume_step=0)
    bar.draw([(runs[0], run.path)])  # nothing logged yet: no line
    log.write({"step": 2, "train_loss": 4.0})
    bar.draw([(runs[0], run.path)])  # a log step: one plain line
    bar.draw([(runs[0], run.path)])  # nothing new: none
    log.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in stream.getvalue()
    assert lines[0].startswith("sweep [") and "0/2 runs done, 1 running" in lines[0]
    quiet = io.StringIO()
    launcher.Progress(runs, quiet, enabled=False).draw([(runs[0], run.path)])  # --noprogress
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("name,sizes,steps,checkpoint_every", [
    ("journey_tiny", ("nano", "tiny", "mini"), (150, 300, 600), 100),
    ("journey_powered", ("nano", "micro", "tiny", "mini"), (80, 160, 320), 80),
])
def test_journey_sweeps_list_their_grid_and_validate(name, sizes, steps, checkpoint_every):
    """The two Journey sweeps (journey_powered builds on journey_tiny's recipe and grid): every
    size x budget x {dense, 0.5, 0.75} once, every run's config checked, dense runs dense."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / f"{name}.py"
    runs = sweep.configs(str(recipe))  # validates and checks every run's config
    grid = {(s.model.size, s.train.steps, s.sparsity.final) for _, _, s in runs}
    assert len(runs) == len(grid) == len(sizes) * len(steps) * 3
    assert grid == {(z, n, f) for z in sizes for n in steps for f in (0.0, 0.5, 0.75)}
    for _, _, s in runs:
        assert (s.sparsity.method == "dense") == (s.sparsity.final == 0.0)
        assert s.checkpoint.every == checkpoint_every and s.data.val_fraction == 1 / 3
