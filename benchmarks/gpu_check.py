"""The project's accelerator check: correctness first, then what matters for training speed.

Run by ``benchmarks/gpu_check.sh`` (at most 8 minutes on one H100, enforced there and by the
task budget here). Tasks, in priority order; each is skipped with a note once the budget left
is below its estimate:

1. **correctness** of the compiled kernels (Pallas Triton on GPU; interpret mode in ``--tiny``)
   against float64 numpy: BSR forward, dX, dW on odd row counts, 3-D inputs, empty block rows
   and columns, no stored blocks, all blocks, bf16 and f32; N:M 2:4, 1:4, 4:8 forward, dX, dW;
   and the dtype a bf16 ``BSRLinear`` computes in (mixed precision must survive the layer).
2. **kernels vs cuBLAS dense in bf16**: BSR forward and forward+backward with the backward
   split into dX (BSR of the transposed layout) and dW (SDDMM on the stored blocks), at
   0/50/90% block sparsity on 4096x4096 with 8192 tokens and on GPT-shaped layers (768x3072,
   3072x768; 2048x8192 for 1.3B), 128x128 blocks.
3. **a GPT train step** (12x768, ff 3072, seq 1024, batch 16; bf16 compute, f32 params and
   optimizer state): dense vs BSR layers (10% block density) vs masked dense
   (``sparsify(static 0.9)``), with step time, tokens/s, compile time and MFU
   (:mod:`sparsejax.run.hardware`).
4. **jax-triton** (the ``gpu`` extra): imported, version printed, and one ``triton_call``
   kernel run against numpy, so the extra is exercised where it is installed.

Timings run the op ``n`` times inside one jitted ``fori_loop`` (an ``optimization_barrier``
stops XLA hoisting it), median of several runs: Python dispatch is not in any figure.
``--tiny`` shrinks every shape and runs on CPU in Pallas interpret mode: it checks that this
script works (the test suite runs it) and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import BSRMatrix, NMMatrix, bsr_matmul, nm_matmul
from pallas_kernels.block_sparse import ops as bsr_ops
from pallas_kernels.block_sparse.traffic import expected_seconds
from pallas_kernels.roofline import DEVICES, device_for_kind, table_row

BF16 = jnp.bfloat16


class Check:
    """The run's settings, results and time budget."""

    def __init__(self, tiny: bool, budget_s: float):
        self.tiny, self.budget_s, self.t0 = tiny, budget_s, time.time()
        self.backend = "interpret_gpu" if tiny else "pallas"
        self.impl = "interpret_gpu" if tiny else jax.devices()[0].platform
        self.results: dict[str, Any] = {"correctness": [], "kernels": [], "train": [],
                                        "notes": []}

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def note(self, msg: str) -> None:
        print(f"NOTE {msg}", flush=True)
        self.results["notes"].append(msg)


def bench(fn: Callable[..., Any], args: tuple, *, tiny: bool, runs: int = 5) -> float:
    """Seconds per call of ``fn(*args)``: ``n`` calls in one jitted loop, median of ``runs``."""

    def looped(n, args):
        def body(i, acc):
            a = lax.optimization_barrier((args, i))[0]
            return acc + sum(x.reshape(-1)[0].astype(jnp.float32)
                             for x in jax.tree.leaves(fn(*a)))

        return lax.fori_loop(0, n, body, jnp.float32(0))

    f = jax.jit(looped, static_argnums=0)
    jax.block_until_ready(f(1, args))
    t = time.perf_counter()
    jax.block_until_ready(f(1, args))
    one = time.perf_counter() - t
    n = int(min(200, max(1, math.ceil((0.01 if tiny else 0.005) / max(one, 1e-7)))))
    jax.block_until_ready(f(n, args))  # compile this n
    times = []
    for _ in range(2 if tiny else runs):
        t = time.perf_counter()
        jax.block_until_ready(f(n, args))
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)




def random_bsr(k: int, n: int, blk: int, density: float, rng: np.random.Generator, dtype: Any,
               empty_row: int | None = None, empty_col: int | None = None) -> BSRMatrix:
    """A ``k x n`` BSR matrix keeping ``round(density * blocks)`` random blocks (optionally an
    empty block row and column), values N(0, 1/k)."""
    grid = (k // blk, n // blk)
    keep = np.zeros(grid[0] * grid[1], bool)
    keep[rng.permutation(keep.size)[: round(density * keep.size)]] = True
    mask = keep.reshape(grid)
    if empty_row is not None:
        mask[empty_row, :] = False
    if empty_col is not None:
        mask[:, empty_col] = False
    w = rng.standard_normal((k, n)) / math.sqrt(k)
    m = BSRMatrix.from_mask(w.astype(np.float32), mask, (blk, blk))
    return BSRMatrix(m.values.astype(dtype), m.layout)


def f64(a: Any) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def record(check: Check, name: str, got: Any, want: np.ndarray, tol: float) -> None:
    got = f64(got)
    err = float(np.abs(got - want).max(initial=0.0)) / (float(np.abs(want).max(initial=0.0)) + 1)
    ok = bool(err <= tol and np.isfinite(got).all() and got.shape == want.shape)
    check.results["correctness"].append(dict(name=name, rel_err=err, tol=tol, ok=ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name:<70} rel err {err:.2e} (tol {tol:g})", flush=True)


def bsr_correct(check: Check, tag: str, k: int, n: int, blk: int, density: float,
                m_shape: tuple[int, ...], dtype: Any, rng: np.random.Generator, **empty) -> None:
    w = random_bsr(k, n, blk, density, rng, dtype, **empty)
    lay, v = w.layout, w.values
    wd = f64(BSRMatrix(v, lay).to_dense())
    x = jnp.asarray(rng.standard_normal((*m_shape, k)), dtype)
    c = rng.standard_normal((*m_shape, n)).astype(np.float32)
    tol = (1e-5 if check.tiny else 1e-2) if dtype == jnp.float32 else 3e-2  # GPU f32: TF32

    def loss(x, v):
        y = bsr_matmul(x, BSRMatrix(v, lay), backend=check.backend)
        return jnp.sum(y.astype(jnp.float32) * c), y

    (_, y), (dx, dv) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, v)
    xs, cs = f64(x).reshape(-1, k), c.reshape(-1, n).astype(np.float64)
    name = f"bsr {tag} {jnp.dtype(dtype).name} M={m_shape} {k}x{n} blk={blk} nnz={lay.nnz}"
    record(check, name + " fwd", y, (xs @ wd).reshape(*m_shape, n), tol)
    record(check, name + " dX", dx, (cs @ wd.T).reshape(*m_shape, k), tol)
    full = (xs.T @ cs).reshape(k // blk, blk, n // blk, blk).transpose(0, 2, 1, 3)
    record(check, name + " dW", dv, full[lay.rows, lay.cols], tol)


def nm_correct(check: Check, n_: int, m_: int, k: int, n: int, rng: np.random.Generator) -> None:
    a = NMMatrix.from_dense(jnp.asarray(rng.standard_normal((k, n)), BF16), n_, m_, prune=True)
    wd = f64(a.to_dense())
    x = jnp.asarray(rng.standard_normal((37, k)), BF16)
    c = rng.standard_normal((37, n)).astype(np.float32)

    def loss(x, v):
        y = nm_matmul(x, NMMatrix(v, a.codes, a.shape, a.n, a.m), backend=check.backend)
        return jnp.sum(y.astype(jnp.float32) * c), y

    (_, y), (dx, dv) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, a.values)
    want_dv = jax.grad(lambda v: jnp.sum(x.astype(jnp.float32) @ NMMatrix(
        v, a.codes, a.shape, a.n, a.m).to_dense().astype(jnp.float32) * c))(a.values)
    name = f"nm {n_}:{m_} bfloat16 {k}x{n}"
    record(check, name + " fwd", y, f64(x) @ wd, 3e-2)
    record(check, name + " dX", dx, c.astype(np.float64) @ wd.T, 3e-2)
    record(check, name + " dW", dv, f64(want_dv), 3e-2)


def task_correctness(check: Check) -> None:
    rng = np.random.default_rng(0)
    k, n, blocks = (64, 96, (16,)) if check.tiny else (512, 384, (32, 64, 128))
    for blk in blocks:
        for dtype in (BF16, jnp.float32):
            bsr_correct(check, "random, empty row/col", k, n, blk, 0.5, (37,), dtype, rng,
                        empty_row=1, empty_col=2)
    blk = blocks[-1]
    bsr_correct(check, "3-D x, M<16", k, n, blk, 0.5, (2, 5), BF16, rng)
    bsr_correct(check, "all blocks", k, n, blk, 1.0, (130,), BF16, rng)
    bsr_correct(check, "no blocks", k, n, blk, 0.0, (9,), BF16, rng)
    for n_, m_ in ((2, 4),) if check.tiny else ((2, 4), (1, 4), (4, 8)):
        nm_correct(check, n_, m_, 256 if check.tiny else 1024, 64 if check.tiny else 256, rng)
    from flax import nnx

    from pallas_kernels.layers import bsr_linear_factory

    # as a bf16 GPT builds it: f32 params, the model's compute dtype handed to the layer
    layer = bsr_linear_factory((blk, blk), 0.5, backend=check.backend)(
        k, n, use_bias=True, rngs=nnx.Rngs(0), dtype=BF16)
    out = layer(jnp.ones((4, k), BF16)).dtype
    check.results["layer_dtype"] = str(out)
    check.note(f"BSRLinear (f32 params) on bf16 activations computes in {out}"
               + ("" if out == BF16 else ": mixed precision is lost after a sparse layer"))


def kernel_case(check: Check, k: int, n: int, m: int, blk: int, density: float, tag: str,
                *, grad: bool) -> None:
    rng = np.random.default_rng(k * 7 + n * 3 + m + blk + round(100 * density))
    w = random_bsr(k, n, blk, density, rng, BF16)
    lay, v = w.layout, w.values
    wd = BSRMatrix(v, lay).to_dense()
    x = jnp.asarray(rng.standard_normal((m, k)), BF16)
    row = dict(tag=tag, K=k, N=n, M=m, block=blk, sparsity=round(1 - lay.density, 3),
               kind="fwd+bwd" if grad else "fwd")
    t = check.tiny
    bsr = lambda x, v: bsr_matmul(x, BSRMatrix(v, lay), backend=check.backend)  # noqa: E731
    if not grad:
        row["dense_us"] = 1e6 * bench(lambda x, w: x @ w, (x, wd), tiny=t)
        row["sparse_us"] = 1e6 * bench(bsr, (x, v), tiny=t)
    else:
        c = jnp.asarray(rng.standard_normal((m, n)), BF16)

        def grads(mm):
            return jax.grad(lambda x, w: jnp.sum(mm(x, w).astype(jnp.float32)
                                                 * c.astype(jnp.float32)), (0, 1))

        row["dense_us"] = 1e6 * bench(grads(lambda x, w: x @ w), (x, wd), tiny=t)
        row["sparse_us"] = 1e6 * bench(grads(bsr), (x, v), tiny=t)
        tiles = None  # chosen by shape (pallas_kernels.block_sparse.tiles), as in training
        vt = jnp.swapaxes(v[lay.transpose_perm], 1, 2)
        row["dX_sparse_us"] = 1e6 * bench(
            lambda g, vt: bsr_ops._forward(g, vt, lay.transposed, check.impl, tiles), (c, vt),
            tiny=t)
        row["dX_dense_us"] = 1e6 * bench(lambda g, w: g @ w.T, (c, wd), tiny=t)
        row["dW_sparse_us"] = 1e6 * bench(
            lambda x, g: bsr_ops._sddmm(x, g, lay, check.impl, tiles), (x, c), tiny=t)
        row["dW_dense_us"] = 1e6 * bench(lambda x, g: x.T @ g, (x, c), tiny=t)
    row["speedup"] = row["dense_us"] / row["sparse_us"]
    # the roofline model's prediction next to the measurement (benchmarks/roofline.py)
    device = device_for_kind(jax.devices()[0].device_kind) or DEVICES["h100"]
    passes = ("forward", "dX", "dW") if grad else ("forward",)
    rows = [table_row(m, k, n, lay.density, 2, p, device,
                      expected_seconds(m, k, n, lay.density, blk, 2, p, device)) for p in passes]
    row["expected_x"] = sum(r.dense_s for r in rows) / sum(r.expected_s for r in rows)
    check.results["kernels"].append(row)
    split = (f"  dX {row['dX_sparse_us']:.0f}/{row['dX_dense_us']:.0f}us"
             f"  dW {row['dW_sparse_us']:.0f}/{row['dW_dense_us']:.0f}us" if grad else "")
    print(f"{row['kind']:<8}{tag:<9}{k}x{n} M={m:<6}blk={blk:<4}sparse={row['sparsity']:<6}"
          f"dense {row['dense_us']:9.1f}us  bsr {row['sparse_us']:9.1f}us  "
          f"x{row['speedup']:5.2f} (roofline expects x{row['expected_x']:5.2f}){split}",
          flush=True)


def kernel_tasks(check: Check) -> list[tuple[str, Callable[[], None], float]]:
    big, m, blk = (128, 64, 16) if check.tiny else (4096, 8192, 128)
    d, ff, m_gpt = (64, 256, 64) if check.tiny else (768, 3072, 16384)
    out: list[tuple[str, Callable[[], None], float]] = []
    for s in (0.9,) if check.tiny else (0.9, 0.5, 0.0):
        out.append((f"fwd {big}^2 {s:.0%}", lambda s=s: kernel_case(
            check, big, big, m, blk, 1 - s, "square", grad=False), 15))
        out.append((f"fwd+bwd {big}^2 {s:.0%}", lambda s=s: kernel_case(
            check, big, big, m, blk, 1 - s, "square", grad=True), 40))
    for k_, n_ in ((d, ff),) if check.tiny else ((d, ff), (ff, d), (2048, 8192)):
        for s in (0.9,) if check.tiny else (0.5, 0.9):
            out.append((f"gpt {k_}x{n_} {s:.0%}", lambda k_=k_, n_=n_, s=s: kernel_case(
                check, k_, n_, m_gpt, blk, 1 - s, "gpt", grad=True), 40))
    return out


def train_case(check: Check, name: str, overrides: dict[str, Any]) -> None:
    """Step time, tokens/s, compile time and MFU of the GPT train step of a config."""
    from flax import nnx

    from sparsejax.models.gpt import GPT
    from sparsejax.run import accounting, build, configlib, experiment, hardware
    from sparsejax.run.step import TrainState, flops_coefficients, is_sparse, make_train_step

    size, seq, batch = ("tiny", 64, 2) if check.tiny else ("L", 1024, 16)
    c = configlib.base()
    base = {"model.size": size, "model.n_ctx": seq, "train.seq_len": seq,
            "train.batch_size": batch, "model.dtype": "bfloat16"}
    for key, value in {**base, **overrides}.items():
        configlib.set_key(c, key, value)
    spec = configlib.validate(c)
    blueprint = experiment.check(spec)
    t_build = time.perf_counter()
    model = GPT(blueprint.model_cfg, rngs=nnx.Rngs(0),
                linear=build.linear_factory(spec, blueprint.wide))
    graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params_state)
    tx = blueprint.tx
    sparse = is_sparse(tx, params)
    fixed, dense = flops_coefficients(model, seq)
    step = make_train_step(graphdef, jax.tree_util.tree_structure(params_state), rest, tx,
                           fixed_flops=fixed, dense_flops=dense,
                           tokens_per_step=float(batch * seq), sparse=sparse,
                           structural=accounting.structural_stats(model, params))
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0),
                       *(jnp.zeros((), jnp.float32) for _ in range(3)), jnp.zeros((), jnp.int32))
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.integers(0, 256, (batch, seq), dtype=np.int32)) for _ in range(2)]
    build_s = time.perf_counter() - t_build
    t = time.perf_counter()
    state, _ = step(state, xs[0], xs[1])
    jax.block_until_ready(state.params)
    compile_s = time.perf_counter() - t
    n = 2 if check.tiny else 10
    flops0 = float(state.flops)
    t = time.perf_counter()
    for i in range(n):
        state, _ = step(state, xs[i % 2], xs[(i + 1) % 2])
    jax.block_until_ready(state.params)
    step_s = (time.perf_counter() - t) / n
    flops = float(state.flops) - flops0
    util = hardware.mfu(flops, step_s * n, jax.devices()[:1])
    row = dict(name=name, size=size, seq=seq, batch=batch, step_ms=1e3 * step_s,
               tokens_per_s=batch * seq / step_s, compile_s=round(compile_s, 1),
               build_s=round(build_s, 1), model_TFLOPs=flops / (step_s * n) / 1e12, mfu=util)
    check.results["train"].append(row)
    mfu_s = "n/a" if util is None else f"{util:.1%}"
    print(f"train {name:<34}{row['step_ms']:9.1f} ms/step {row['tokens_per_s']:>10.0f} tok/s  "
          f"compile {compile_s:5.1f}s  MFU {mfu_s}", flush=True)


def train_tasks(check: Check) -> list[tuple[str, Callable[[], None], float]]:
    blk = 16 if check.tiny else 128
    bsr = {"model.linear": "bsr", "model.block": blk, "sparsity.method": "static",
           "sparsity.score": "random", "sparsity.final": 0.9}
    masked = {"sparsity.method": "static", "sparsity.final": 0.9}
    return [("train dense", lambda: train_case(check, "dense bf16", {}), 60),
            ("train bsr", lambda: train_case(check, f"bsr {blk} 90% bf16", bsr), 120),
            ("train masked", lambda: train_case(check, "masked dense static 90%", masked), 60)]


def task_jax_triton(check: Check) -> None:
    """Import jax-triton and run one ``triton_call`` kernel (an elementwise add) vs numpy."""
    try:
        import jax_triton as jt
        import triton
        import triton.language as tl
    except ImportError as e:
        check.results["jax_triton"] = f"not installed ({e}); pip install 'sparsejax[gpu]'"
        check.note(f"jax-triton: {check.results['jax_triton']}")
        return
    version = getattr(jt, "__version__", "?")
    if jax.devices()[0].platform != "gpu":
        check.results["jax_triton"] = f"imported {version}; no GPU to run a kernel on"
        check.note(f"jax-triton: {check.results['jax_triton']}")
        return

    @triton.jit
    def add_kernel(x_ptr, y_ptr, out_ptr, n: tl.constexpr, block: tl.constexpr):
        offs = tl.program_id(0) * block + tl.arange(0, block)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask)
                 + tl.load(y_ptr + offs, mask=mask), mask=mask)

    n, block = 4096, 1024
    x = jnp.arange(n, dtype=jnp.float32)
    y = jnp.full((n,), 2.0, jnp.float32)
    out = jt.triton_call(x, y, kernel=add_kernel, out_shape=jax.ShapeDtypeStruct((n,), x.dtype),
                         grid=(n // block,), n=n, block=block)
    ok = bool(np.array_equal(np.asarray(out), np.arange(n, dtype=np.float32) + 2.0))
    check.results["jax_triton"] = f"{version}: triton_call add kernel {'ok' if ok else 'WRONG'}"
    print(f"jax-triton {check.results['jax_triton']}", flush=True)
    if not ok:
        check.results["correctness"].append(dict(name="jax-triton add", ok=False))


def tasks(check: Check) -> list[tuple[str, Callable[[], None], float]]:
    """(name, task, seconds it needs on an H100 including compiles), most important first."""
    return [("correctness", lambda: task_correctness(check), 90),
            ("jax-triton", lambda: task_jax_triton(check), 10),
            *kernel_tasks(check), *train_tasks(check)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny shapes, interpret mode")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all tasks")
    p.add_argument("--only", default="", help="comma-separated substrings of task names")
    args = p.parse_args(argv)
    check = Check(args.tiny, args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check.results["env"] = dict(jax=jax.__version__, devices=str(jax.devices()),
                                backend=check.backend, tiny=args.tiny)
    print(f"gpu_check: jax {jax.__version__} on {jax.devices()[0].device_kind}, kernels "
          f"{check.backend}, budget {args.budget:.0f}s", flush=True)
    only = [s for s in args.only.split(",") if s]
    for name, task, needs in tasks(check):
        if only and not any(s in name for s in only):
            continue
        if check.left() < needs:
            check.note(f"skipped {name!r}: {check.left():.0f}s left, it needs ~{needs:.0f}s")
            continue
        try:
            task()
        except Exception as e:  # one task's failure must not hide the others' results
            check.note(f"task {name!r} failed: {type(e).__name__}: {str(e)[:300]}")
            check.results["correctness"].append(dict(name=f"task {name}", ok=False))
            traceback.print_exc(limit=3)
        (out / "gpu_check.json").write_text(json.dumps(check.results, indent=1, default=str))
    bad = [r["name"] for r in check.results["correctness"] if not r["ok"]]
    print(f"\ngpu_check: correctness {len(check.results['correctness']) - len(bad)}/"
          f"{len(check.results['correctness'])} ok; {len(check.results['kernels'])} kernel rows; "
          f"{len(check.results['train'])} train rows; {time.time() - check.t0:.0f}s; "
          f"{out / 'gpu_check.json'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
