"""Training end to end: loss goes down, logged sparsity follows the schedule, kill + resume is
bitwise equal to an uninterrupted run (run-dir status and faults: test_run_status.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparsejax.downstream import loading
from sparsejax.errors import ConfigError
from sparsejax.run import build, checkpoint, configlib, experiment, rundir, train
from sparsejax.run.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = ("size=tiny,model.n_ctx=64,train.seq_len=64,train.batch_size=8,eval.batch_size=8,"
        "eval.final_batches=1")


def load_recipe(name: str, arg: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def run_config(config, workdir):
    return experiment.run(config, str(workdir), progress=False)


@pytest.mark.slow
def test_gradual_run_lowers_loss_and_follows_schedule(tmp_path):
    c = load_recipe("gradual_magnitude", TINY + ",steps=30")
    c.train.log_every = 2
    c.eval.every = 30
    c.eval.batches = 2
    c.sparsity.update_every = 2
    c.train.warmup_steps = 3
    summary = run_config(c, tmp_path / "run")
    records = rundir.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(2, 31, 2))
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 1.0
    assert summary["val_loss"] < 4.0 and summary["status"] == "completed"
    n_prunable = summary["n_prunable"]
    sched = experiment.check(c).sparsity_schedule
    for r in records:
        target = float(sched(r["step"] - 1))
        assert r["target_sparsity"] == pytest.approx(target)
        expected_pruned = int(np.round(np.float32(target) * np.float32(n_prunable)))
        assert r["n_active"] == summary["n_params"] - expected_pruned, r
    assert records[-1]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    # N_avg = mean over all 30 steps of the active count implied by the schedule
    n_avg = np.mean([summary["n_params"] - int(np.round(np.float32(sched(t)) * n_prunable))
                     for t in range(30)])
    assert summary["n_avg"] == pytest.approx(n_avg, rel=1e-6)
    # load for fine-tuning: dense (SPDF) and with masks
    params, masks = loading.load_for_finetuning(tmp_path / "run", dense=True)
    assert masks is None
    blocks = params["blocks"]
    k = (blocks["0"] if "0" in blocks else blocks[0])["mlp"]["fc_in"]["kernel"]
    assert (k == 0).any()
    _, masks = loading.load_for_finetuning(tmp_path / "run", dense=False)
    assert masks is not None


def _cli(workdir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "sparsejax", "train",
            f"--config={ROOT / 'configs' / 'gradual_magnitude.py'}:{TINY}",
            f"--workdir={workdir}", f"--config.train.steps={steps}",
            "--config.checkpoint.every=5", "--config.train.log_every=5",
            "--config.eval.every=10", "--config.eval.batches=1",
            "--config.sparsity.update_every=2", "--config.train.warmup_steps=2",
            "--noprogress"]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_sigkill_resume_is_bitwise_equal(tmp_path, capsys):
    from sparsejax import cli

    steps = 20
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert cli.main(_cli(ref, steps)[3:]) == 0  # in this process: the same command

    proc = subprocess.Popen(_cli(killed, steps), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "10").is_dir():
        assert proc.poll() is None, "run ended before its second checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.latest_step(killed) < steps
    assert json.loads((killed / "summary.json").read_text())["status"] == "running"
    assert rundir.run_status(killed).status == "interrupted"  # its process is gone
    assert rundir.run_status(killed).checkpoint == checkpoint.latest_step(killed)
    capsys.readouterr()
    assert cli.main(_cli(killed, steps)[3:]) == 0  # the same command resumes
    assert "final validation loss" in capsys.readouterr().out

    a, b = checkpoint.load_raw(ref), checkpoint.load_raw(killed)
    flat_a = dict(_flatten(a))
    flat_b = dict(_flatten(b))
    assert flat_a.keys() == flat_b.keys()
    for key, va in flat_a.items():
        np.testing.assert_array_equal(va, flat_b[key], err_msg=key)  # params, masks, moments
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sb["resumed_from"] > 0
    for key in ("train_loss", "val_loss", "n_active", "n_avg", "flops", "sparsity", "step"):
        assert sa[key] == sb[key], key
    strip = lambda rs: [{k: v for k, v in r.items() if k not in rundir.TIMING_FIELDS}
                        for r in rs]
    assert strip(rundir.read_metrics(ref)) == strip(rundir.read_metrics(killed))

    # unstructured pruning saves nothing as BSR: the export is refused (in-process CLI call)
    assert cli.main(["export", "--format", "bsr", str(ref), "--block", "16,16"]) == 2
    assert not (ref / "export").exists()


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, np.asarray(tree)


def test_workdir_with_other_config_refuses(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(ValueError, match="different config"):
        train._check_config_matches(RunDir(tmp_path), {"seed": 2})


@pytest.mark.slow
def test_static_block_sparse_training_on_bsr_kernels(tmp_path):
    c = load_recipe("static_random", TINY + ",steps=4,model.linear=bsr,model.block=16")
    c.train.log_every = 2
    c.train.warmup_steps = 1
    c.eval.every = 4
    c.eval.batches = 1
    summary = run_config(c, tmp_path / "bsr")
    assert summary["status"] == "completed"
    assert summary["sparsity"] == pytest.approx(0.75)
    params, _ = loading.load_for_finetuning(tmp_path / "bsr")
    blocks = params["blocks"]
    fc_in = (blocks["0"] if "0" in blocks else blocks[0])["mlp"]["fc_in"]
    assert fc_in["values"].shape == (16, 16, 16)  # 64x256 in 16x16 blocks, 25% kept
    bad = load_recipe("gradual_magnitude", "model.linear=bsr")
    with pytest.raises(ValueError, match="model.linear"):
        configlib.validate(bad)


@pytest.mark.slow
def test_static_nm_training_on_nm_kernels(tmp_path):
    """model.linear=nm: 2:4 layers (pallas_kernels.layers.NMLinear, the CPU path) keep the
    largest half of every group of the initial weights and train a few steps."""
    c = load_recipe("base", TINY + ",steps=4,model.linear=nm,sparsity.method=nm")
    c.train.log_every = 2
    c.train.warmup_steps = 1
    c.eval.every = 4
    c.eval.batches = 1
    summary = run_config(c, tmp_path / "nm")
    assert summary["status"] == "completed"
    assert summary["sparsity"] == pytest.approx(0.5)
    losses = [r["train_loss"] for r in rundir.RunDir(tmp_path / "nm").read_metrics()]
    assert losses[-1] < losses[0]
    params, _ = loading.load_for_finetuning(tmp_path / "nm")
    blocks = params["blocks"]
    fc_out = (blocks["0"] if "0" in blocks else blocks[0])["mlp"]["fc_out"]
    assert fc_out["values"].shape == (128, 64)  # (256, 64) kernel, 2 of every 4 along K
    for bad, key in (("sparsity.method=static,sparsity.final=0.5", "model.linear"),
                     ("sparsity.method=nm,sparsity.n=4", "sparsity.n")):
        with pytest.raises(ValueError, match=key):
            configlib.validate(load_recipe("base", f"model.linear=nm,{bad}"))
    for bad, words in (("model.linear=nm,sparsity.method=nm,sparsity.n=1,sparsity.m=3",
                        "m = 3 must divide K"),
                       ("model.linear=bsr,sparsity.method=static,sparsity.score=random,"
                        "sparsity.final=0.5,model.block=48", "not divisible by block")):
        with pytest.raises(ConfigError, match=words):  # before any data or weights
            build.blueprint(configlib.validate(load_recipe("base", bad)))


@pytest.mark.slow
def test_wandb_offline_logging(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    c = load_recipe("dense", TINY + ",steps=2")
    c.train.log_every = 1
    c.train.warmup_steps = 1
    c.eval.every = 2
    c.eval.batches = 1
    c.wandb.enabled = True  # mode stays "offline": nothing touches the network
    run_config(c, tmp_path / "wb")
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
