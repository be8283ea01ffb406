"""Scale-out: the (data, fsdp) mesh, sharded sparse training, checkpoints across meshes, the
mask update's collectives, and a two-process ``jax.distributed`` run (issue 15).

The 8-device checks run in one child process (``tests/_scale_out_child.py``) with
``--xla_force_host_platform_device_count=8``, so the rest of the suite keeps one device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sparsejax import radix
from sparsejax.run import checkpoint, configlib, distributed

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "_scale_out_child.py"
TOL = 1e-5


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory) -> tuple[Path, dict, list[tuple[int, str]]]:
    """Three children at once (their compiles share the cores): one with 8 devices
    (single-device and (2, 4) runs, resumes on (4, 2) and (1, 8), the HLO checks, the eval
    queue) and two
    ``jax.distributed`` processes with 4 devices each training the (2, 4) run."""
    out = tmp_path_factory.mktemp("scale_out")
    port = _free_port()
    cmds = [(["mesh", str(out)], 8)] + [(["process", str(out), str(port), str(i)], 4)
                                       for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(CHILD), *args], env=_env(devices),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for args, devices in cmds]
    logs = []
    for p in procs:
        text = p.communicate(timeout=600)[0]
        logs.append((p.returncode, text))
    # the child writes mesh.json before its last check (the eval queue), which may abort it
    assert (out / "mesh.json").exists(), logs[0][1][-4000:]
    res = json.loads((out / "mesh.json").read_text())
    res["child"] = {"returncode": logs[0][0], "log": logs[0][1][-4000:]}
    return out, res, logs[1:]


def _same_run(result: dict) -> None:
    assert result["masks_equal"], result
    assert result["n_masks"] == 12  # every attention/MLP kernel of the tiny model is masked
    assert result["density"] == pytest.approx(0.5, abs=1e-6)  # the global top-k did prune
    assert result["max_param_diff"] < TOL, result


@pytest.mark.slow
def test_sharded_run_matches_single_device(mesh_runs):
    """20 steps of gradual global magnitude on a (2, 4) mesh == on one device."""
    _, res, _ = mesh_runs
    _same_run(res["single_vs_2x4"])


@pytest.mark.slow
def test_checkpoint_from_2x4_continues_on_4x2_and_1x8(mesh_runs):
    _, res, _ = mesh_runs
    for name in ("resume_4x2", "resume_1x8"):
        assert res[f"{name}_resumed_from"] == 10
        _same_run(res[f"2x4_vs_{name}"])


@pytest.mark.slow
def test_mask_update_hlo_gathers_no_weight(mesh_runs):
    """The compiled global top-k update of sharded params: histograms are all-reduced, no
    all-gather / all-to-all / collective-permute of any array."""
    _, res, _ = mesh_runs
    hlo = res["hlo"]
    assert hlo["all_gathers"] == []
    assert hlo["all_reduces"] >= 2  # one per radix pass at least
    assert hlo["sharded_leaves"] > 0
    # fc_in (64, 256) is sharded along its largest dim, fc_out (256, 64) along its first
    assert hlo["param_shardings"]["['blocks']/[0]/['mlp']/['fc_in']/['kernel']"] == [None, "fsdp"]
    assert hlo["param_shardings"]["['blocks']/[0]/['mlp']/['fc_out']/['kernel']"] == ["fsdp", None]


@pytest.mark.slow
def test_sparse_kernels_compute_only_their_own_batch_rows(mesh_runs):
    """The compiled train step of a BSR model on (2, 4) and (8, 1): every kernel call (on this
    CPU the native kernels' FFI custom calls: forward, dX and dW of each layer) takes the
    device's 512 / 8 rows, and no array with the batch's rows is all-gathered (the packed
    weights are, over fsdp). The control, the same step without the mesh in context, shows
    what XLA does with an op it cannot split: every device runs all 512 rows."""
    _, res, _ = mesh_runs
    if res["native"]:
        pytest.skip(f"native BSR kernels unavailable: {res['native']}")
    rows, n = res["kernel_rows"], 8
    expected = {"sparsejax_bsr_matmul_f32": 2 * res["bsr_layers"],
                "sparsejax_bsr_sddmm_f32": res["bsr_layers"]}

    def summary(hlo):
        counts = {t: sum(c[0] == t for c in hlo["calls"]) for t in expected}
        matmul_rows = {c[1][0] for c in hlo["calls"] if c[0].endswith("matmul_f32")}
        return counts, {c[2] for c in hlo["calls"]}, matmul_rows, hlo["gathers"]

    for mesh in ("2x4", "8x1"):
        counts, operand_rows, out_rows, gathers = summary(res[f"kernel_{mesh}"])
        assert counts == expected, mesh
        assert operand_rows == out_rows == {rows // n}, mesh
        assert not [g for g in gathers if rows in g], mesh  # no activations all-gathered
    assert res["kernel_8x1"]["gathers"] == []  # fsdp=1: not even the weights
    counts, operand_rows, out_rows, gathers = summary(res["kernel_2x4_no_mesh"])
    assert counts == expected
    assert operand_rows == out_rows == {rows}
    assert len([g for g in gathers if g[0] == rows]) >= res["bsr_layers"]


@pytest.mark.slow
def test_sparse_layers_split_over_the_batch_match_one_device(mesh_runs):
    """Loss and gradients of a BSR and an N:M layer on (2, 4), each device multiplying its
    own rows (the weights' gradient summed over the devices), equal one device's."""
    _, res, _ = mesh_runs
    assert set(res["kernel_grad_diff"]) == {"bsr", "nm"}
    assert max(res["kernel_grad_diff"].values()) < 1e-5, res["kernel_grad_diff"]


@pytest.mark.slow
def test_a_long_eval_queue_on_8_devices_does_not_abort(mesh_runs):
    """96 sharded loss launches through ``evaluation.evaluate``, twice, on the (2, 4) mesh: the
    child finishes (before the fix XLA's CPU rendezvous timed out and aborted it)."""
    _, res, _ = mesh_runs
    assert res["child"]["returncode"] == 0, res["child"]["log"]
    assert res["eval_queue"] == [96 * 8, 96 * 8]  # EVAL_BATCHES x eval.batch_size, twice


@pytest.mark.slow
def test_two_processes_match_one_8_device_process(mesh_runs):
    """2 processes x 4 CPU devices (jax.distributed, gloo collectives) train the (2, 4) run:
    same params and masks as one 8-device process; only process 0 wrote the run files."""
    out, _, processes = mesh_runs
    assert [rc for rc, _ in processes] == [0, 0], "\n".join(log[-3000:] for _, log in processes)
    for i in range(2):
        info = json.loads((out / f"process{i}.json").read_text())
        assert info == {"process_count": 2, "device_count": 8, "local_devices": 4}
    sys.path.insert(0, str(CHILD.parent))
    import _scale_out_child as child

    _same_run(child.compare(child.final_state(out / "mesh_2x4"),
                            child.final_state(out / "two_process")))
    steps = [r["step"] for r in child._metrics(out / "two_process")]
    assert steps == [5, 10, 15, 20]  # one writer
    summary = json.loads((out / "two_process" / "summary.json").read_text())
    assert summary["status"] == "completed"


# --- cheap in-process checks -------------------------------------------------------------


def test_mesh_config_keys_validated():
    base = configlib.base()
    assert (base.mesh.data, base.mesh.fsdp) == (-1, 1)
    configlib.validate(base)
    for key, value, match in [
        ("mesh.data", 0, "mesh.data must be -1"),
        ("mesh.fsdp", -2, "mesh.fsdp must be -1"),
        ("mesh.num_processes", -1, "mesh.num_processes must be an int >= 0"),
        ("mesh.process_id", -2, "mesh.process_id must be an int >= -1"),
        ("mesh.coordinator", "localhost", "mesh.coordinator must be 'host:port'"),
    ]:
        c = configlib.base()
        configlib.set_key(c, key, value)
        with pytest.raises(ValueError, match=match):
            configlib.validate(c)
    c = configlib.apply_arg(configlib.base(), "mesh.data=-1,mesh.fsdp=-1")
    with pytest.raises(ValueError, match="mesh.data/fsdp must be at most one -1"):
        configlib.validate(c)
    c = configlib.apply_arg(configlib.base(), "mesh.num_processes=2,mesh.process_id=2")
    with pytest.raises(ValueError, match=r"mesh.process_id must be < mesh.num_processes \(2\)"):
        configlib.validate(c)
    c = configlib.apply_arg(configlib.base(), "mesh.coordinator=h:1,mesh.num_processes=2")
    with pytest.raises(ValueError, match="mesh.num_processes/process_id must be both set"):
        configlib.validate(c)


def test_mesh_resolution_and_param_specs():
    assert distributed.resolve(distributed.MeshShape(-1, 1), 8) == (8, 1)
    assert distributed.resolve(distributed.MeshShape(2, -1), 8) == (2, 4)
    assert distributed.resolve(distributed.MeshShape(-1, 4), 8) == (2, 4)
    with pytest.raises(ValueError, match="mesh.fsdp=3 must divide the 8 devices"):
        distributed.resolve(distributed.MeshShape(-1, 3), 8)
    with pytest.raises(ValueError, match=r"2 \* 2 must equal the number of devices \(8\)"):
        distributed.resolve(distributed.MeshShape(2, 2), 8)
    P = jax.sharding.PartitionSpec
    assert distributed.param_spec((64, 256), 4) == P(None, "fsdp")
    assert distributed.param_spec((256, 64), 4) == P("fsdp", None)
    assert distributed.param_spec((64, 64), 4) == P("fsdp", None)  # ties: the first
    assert distributed.param_spec((6, 4), 4) == P(None, "fsdp")  # 6 is not divisible
    assert distributed.param_spec((3, 5), 4) == P()
    assert distributed.param_spec((64, 256), 1) == P()
    assert distributed.make_mesh().shape == {"data": jax.device_count(), "fsdp": 1}


def test_batch_must_split_over_the_mesh():
    class TwoDevices:  # a mesh's size and shape are all check_batch reads
        size = 2
        shape = {"data": 2, "fsdp": 1}

    distributed.check_batch("train.batch_size", 4, TwoDevices())
    with pytest.raises(ValueError, match=r"train.batch_size \(3\) must be a multiple of the "
                       r"mesh's 2 devices"):
        distributed.check_batch("train.batch_size", 3, TwoDevices())


def test_flat_position_is_row_major_index():
    pos = radix._flat_position((3, 4, 5), 7)
    np.testing.assert_array_equal(np.asarray(pos), np.arange(60).reshape(3, 4, 5) + 7)


def test_fingerprint_host_equals_device_and_detects_one_changed_bit():
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(8, 16)).astype(np.float32),
            "m": rng.integers(0, 2, (16, 8)).astype(bool), "n": np.int32(3),
            "h": rng.normal(size=(5,)).astype(np.float16)}
    host = checkpoint.fingerprint(tree)
    dev = {k: jax.numpy.asarray(v) for k, v in tree.items()}
    assert checkpoint.fingerprint(dev) == host
    # independent reference for one leaf: the two sums in Python integers mod 2**32
    words = tree["w"].view(np.uint32).ravel().astype(np.int64)
    pos = np.arange(words.size, dtype=np.int64)
    s1 = int(np.sum(words * (2 * pos + 1)) % 2**32)
    got = np.asarray(checkpoint._leaf_sums(tree["w"]))
    assert int(got[0]) == s1
    bumped = dict(tree, w=tree["w"].copy())
    bumped["w"].view(np.uint32)[3, 5] ^= 1  # one bit
    assert checkpoint.fingerprint(bumped) != host
