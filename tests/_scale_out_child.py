"""Child process of tests/test_scale_out.py: runs with 8 simulated CPU devices (or as one of
several ``jax.distributed`` processes) so the rest of the suite keeps one device.

``python tests/_scale_out_child.py mesh OUT``: the checks on one 8-device process, results in
``OUT/mesh.json``. ``python tests/_scale_out_child.py process OUT PORT ID``: one of two
processes (4 devices each) training the (2, 4) run in ``OUT/two_process``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 20
# A tiny gradual global-magnitude run: masks change at steps 2, 4, ..., 12 (sparsity 0 -> 0.5)
RUN = dict(sparsity__method="gradual", sparsity__final=0.5, sparsity__allocation="global",
           sparsity__schedule="polynomial", sparsity__begin_step=2, sparsity__end_step=12,
           sparsity__update_every=2, train__batch_size=8, eval__batch_size=8,
           train__steps=STEPS, eval__every=STEPS, train__log_every=5, checkpoint__every=10,
           checkpoint__keep=4)


def config(**overrides):
    sys.path.insert(0, str(HERE))
    from conftest import tiny_config

    return tiny_config(**{**RUN, **overrides})


def final_state(run_dir: Path, step: int = STEPS) -> dict:
    """Params and masks of a run dir's checkpoint at ``step`` as numpy arrays."""
    import jax
    import numpy as np

    from sparsejax.run import checkpoint

    raw = checkpoint.load_raw(run_dir, step)
    flat = lambda tree: {checkpoint._path_name(p): np.asarray(x)  # noqa: E731
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return {"params": flat(raw["params"]),
            "masks": flat(checkpoint.find_masks(raw["opt_state"]))}


def compare(a: dict, b: dict) -> dict:
    import numpy as np

    return {
        "max_param_diff": max(float(np.max(np.abs(a["params"][k] - b["params"][k])))
                              for k in a["params"]),
        "masks_equal": all(np.array_equal(a["masks"][k], b["masks"][k]) for k in a["masks"]),
        "n_masks": sum(v.ndim > 0 for v in a["masks"].values()),
        "density": float(sum(v.sum() for v in a["masks"].values() if v.ndim)
                         / sum(v.size for v in a["masks"].values() if v.ndim)),
    }


def hlo_check(out: dict) -> None:
    """Compile one mask update of the sharded run and list its collectives."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparsejax import methods, prunable
    from sparsejax.run import distributed, experiment

    exp = experiment.build(config())
    params = nnx.to_pure_dict(nnx.split(exp.model, nnx.Param, ...)[1])
    mesh = distributed.make_mesh(distributed.MeshShape(2, 4))
    shardings = distributed.state_shardings(mesh, params, params)
    sharded = jax.device_put(params, shardings)
    pred = prunable.resolve(None)
    method = methods.gradual(exp.sparsity_schedule, allocation="global")
    key = jax.random.PRNGKey(0)
    masks, mstate = method.init(params, key, pred)
    masks = jax.device_put(masks, distributed.state_shardings(mesh, masks, params))

    def update(p, g, m):  # one mask update of gradual global magnitude (step 12: 50%)
        return method.update(p, g, m, mstate, jnp.int32(12), key, pred)[0]

    text = jax.jit(update).lower(sharded, sharded, masks).compile().as_text()
    full = {tuple(x.shape) for x in jax.tree.leaves(params)}
    gathers = [ln.strip()[:160] for ln in text.splitlines()
               if re.search(r"\b(all-gather|all-to-all|collective-permute)(-start)?\(", ln)]
    out["hlo"] = {
        "all_gathers": gathers,
        "all_reduces": len(re.findall(r"\ball-reduce(-start)?\(", text)),
        "sharded_leaves": sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings)),
        "full_weight_shapes": sorted(map(list, full)),
        "param_shardings": {k: list(s.spec) for k, s in
                            zip(["/".join(map(str, p)) for p, _ in
                                 jax.tree_util.tree_flatten_with_path(params)[0]],
                                jax.tree.leaves(shardings), strict=True)
                            if "mlp" in k or "attn" in k},
    }


def _single_device(out_dir: Path) -> None:
    """The reference: ``train.run`` on a mesh of this process's first device."""
    import jax

    from sparsejax.run import configlib, distributed, experiment, train

    spec = configlib.validate(config())
    one = distributed.make_mesh(distributed.MeshShape(1, 1), jax.devices()[:1])
    train.run(spec, experiment.build(spec), out_dir / "single", progress=False, mesh=one)


def _resume(out_dir: Path, data: int, fsdp: int) -> dict:
    """Copy the (2, 4) run dir, drop its last checkpoint, resume on ``(data, fsdp)``."""
    from sparsejax.run import experiment

    name = f"resume_{data}x{fsdp}"
    shutil.copytree(out_dir / "mesh_2x4", out_dir / name)
    shutil.rmtree(out_dir / name / "checkpoints" / str(STEPS))
    (out_dir / name / "summary.json").unlink()
    return experiment.run(config(mesh__data=data, mesh__fsdp=fsdp), str(out_dir / name),
                          progress=False)


def _in_threads(*calls) -> list:
    """Run the zero-argument calls concurrently (XLA compiles release the GIL: two cores,
    two compiles at once). Not for runs that save checkpoints: orbax numbers a process's saves
    with one global operation id, so saves from two threads can mix up their folders."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(fn) for fn in calls]
        return [f.result() for f in futures]


def mesh_checks(out_dir: Path) -> None:
    import jax

    from sparsejax.run import experiment

    assert jax.device_count() == 8, jax.devices()
    out: dict = {}
    t = time.perf_counter()
    # one run at a time (they save checkpoints: see _in_threads)
    _single_device(out_dir)
    experiment.run(config(mesh__data=2, mesh__fsdp=4), str(out_dir / "mesh_2x4"), progress=False)
    out["time_single_and_2x4_s"] = time.perf_counter() - t
    single, sharded = final_state(out_dir / "single"), final_state(out_dir / "mesh_2x4")
    out["single_vs_2x4"] = compare(single, sharded)
    out["step_time_s"] = {name: [r["step_time_s"] for r in _metrics(out_dir / name)]
                          for name in ("single", "mesh_2x4")}
    t = time.perf_counter()
    shapes = ((4, 2), (1, 8))
    summaries = [_resume(out_dir, d, f) for d, f in shapes]
    for (data, fsdp), summary in zip(shapes, summaries, strict=True):
        name = f"resume_{data}x{fsdp}"
        out[f"2x4_vs_{name}"] = compare(sharded, final_state(out_dir / name))
        out[f"{name}_resumed_from"] = summary["resumed_from"]
    out["time_resumes_s"] = time.perf_counter() - t
    t = time.perf_counter()
    hlo_check(out)
    out["time_hlo_s"] = time.perf_counter() - t
    import _scale_out_kernels as kernels

    t = time.perf_counter()
    kernels.kernel_hlo(out)
    kernels.kernel_grads(out)
    out["time_kernels_s"] = time.perf_counter() - t
    (out_dir / "mesh.json").write_text(json.dumps(out, indent=1))
    t = time.perf_counter()
    kernels.eval_queue(out)  # last: before the fix it aborted the process
    out["time_eval_queue_s"] = time.perf_counter() - t
    (out_dir / "mesh.json").write_text(json.dumps(out, indent=1))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def process(out_dir: Path, port: int, pid: int) -> None:
    from sparsejax.run import experiment

    cfg = config(mesh__data=2, mesh__fsdp=4, mesh__coordinator=f"localhost:{port}",
                 mesh__num_processes=2, mesh__process_id=pid)
    experiment.run(cfg, str(out_dir / "two_process"), progress=False)
    import jax

    (out_dir / f"process{pid}.json").write_text(json.dumps(
        {"process_count": jax.process_count(), "device_count": jax.device_count(),
         "local_devices": jax.local_device_count()}))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    kind, out_dir = sys.argv[1], Path(sys.argv[2])
    if kind == "mesh":
        mesh_checks(out_dir)
    else:
        process(out_dir, int(sys.argv[3]), int(sys.argv[4]))
