"""Benchmark: block-sparse (BSR) and N:M matmul against XLA's dense ``jnp.dot``.

Timings are interleaved (dense, sparse, dense, sparse, ...) in one process so machine noise
hits both sides alike; the table reports medians and the ratio dense_time / sparse_time
(> 1: the sparse kernel is faster), taken as the median of per-round ratios. Block masks
are uniformly random with an exact fraction of zero blocks.

CPU (default): f32, 2048x2048 weights, M in {512, 2048}, blocks 64 and 128, block sparsity
50/75/90/95%, backend "cpu" (the fast CPU path).
GPU: ``--preset gpu``: bf16, 8192x8192, M in {8192, 16}, backend "pallas" (Triton), BSR at
0/50/75/90/95% with 128x128 blocks plus N:M 2:4.

``--grad`` times forward + backward instead (dL/dx and dL/dW of ``sum(y * c)``, as in a
training step; BSR dW only at the stored blocks, dense dW in full).

    python benchmarks/kernels.py [--preset cpu|gpu] [--grad] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import BSRMatrix, NMMatrix, bsr_matmul, nm_matmul  # noqa: E402

PRESETS = {
    "cpu": dict(
        dtype="float32",
        size=2048,
        ms=(512, 2048),
        blocks=(64, 128),
        sparsities=(0.5, 0.75, 0.9, 0.95),
        backend="cpu",
        nm=False,
        reps=7,
    ),
    "gpu": dict(
        dtype="bfloat16",
        size=8192,
        ms=(8192, 16),
        blocks=(128,),
        sparsities=(0.0, 0.5, 0.75, 0.9, 0.95),
        backend="pallas",
        nm=True,
        reps=20,
    ),
}


def block_mask(grid: tuple[int, int], sparsity: float, rng) -> np.ndarray:
    total = grid[0] * grid[1]
    keep = np.zeros(total, bool)
    keep[rng.permutation(total)[: round((1 - sparsity) * total)]] = True
    return keep.reshape(grid)


def interleaved(fns: dict, args: dict, reps: int) -> dict[str, float]:
    """Median seconds per function, plus ``speedup``: the median over rounds of the per-round
    ratio dense/sparse (each round times both back to back, so load drift cancels)."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))  # compile + warm up
        jax.block_until_ready(fn(*args[name]))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out["speedup"] = statistics.median(
        d / s for d, s in zip(times["dense"], times["sparse"], strict=True)
    )
    return out


def _with_grad(matmul):
    """``(x, w, c) -> (dL/dx, dL/dw)`` for ``L = sum(matmul(x, w) * c)``: one training step's
    forward and backward through the layer."""

    def loss(x, w, c):
        return jnp.sum(matmul(x, w).astype(jnp.float32) * c)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def run(
    preset: str, reps: int | None = None, ms=None, blocks=None, sparsities=None, grad=False
) -> list:
    cfg = dict(PRESETS[preset])
    reps = reps or cfg["reps"]
    dtype = jnp.dtype(cfg["dtype"])
    size = cfg["size"]
    rng = np.random.default_rng(0)
    dense_dot = jax.jit(lambda x, w: jnp.dot(x, w))
    dense_grad = _with_grad(jnp.dot)
    results = []
    for m in ms or cfg["ms"]:
        x = jnp.asarray(rng.standard_normal((m, size)), dtype)
        c = jnp.asarray(rng.standard_normal((m, size)), jnp.float32)
        for bk in blocks or cfg["blocks"]:
            for s in sparsities or cfg["sparsities"]:
                mask = block_mask((size // bk, size // bk), s, rng)
                w = rng.standard_normal((size, size)).astype(np.float32)
                w = np.asarray(jnp.asarray(w * np.kron(mask, np.ones((bk, bk))), dtype))
                sparse = BSRMatrix.from_dense(w, block=(bk, bk))
                if grad:
                    lay = sparse.layout
                    bsr = _with_grad(
                        lambda x, v, lay=lay: bsr_matmul(
                            x, BSRMatrix(v, lay), backend=cfg["backend"]
                        )
                    )
                    fns = {"dense": dense_grad, "sparse": bsr}
                    args = {"dense": (x, jnp.asarray(w), c), "sparse": (x, sparse.values, c)}
                else:
                    bsr = jax.jit(lambda x, a: bsr_matmul(x, a, backend=cfg["backend"]))
                    fns = {"dense": dense_dot, "sparse": bsr}
                    args = {"dense": (x, jnp.asarray(w)), "sparse": (x, sparse)}
                t = interleaved(fns, args, reps)
                results.append(
                    dict(
                        kind="bsr+bw" if grad else "bsr",
                        m=m,
                        size=size,
                        block=bk,
                        sparsity=s,
                        dense_ms=1e3 * t["dense"],
                        sparse_ms=1e3 * t["sparse"],
                        speedup=t["speedup"],
                    )
                )
                print(_fmt(results[-1]), flush=True)
        if cfg["nm"] and not grad:
            w = rng.standard_normal((size, size)).astype(np.float32)
            sparse = NMMatrix.from_dense(jnp.asarray(w, dtype), 2, 4, prune=True)
            dense_w = sparse.to_dense()
            nmf = jax.jit(lambda x, a: nm_matmul(x, a, backend=cfg["backend"]))
            t = interleaved(
                {"dense": dense_dot, "sparse": nmf},
                {"dense": (x, dense_w), "sparse": (x, sparse)},
                reps,
            )
            results.append(
                dict(
                    kind="nm2:4",
                    m=m,
                    size=size,
                    block=0,
                    sparsity=0.5,
                    dense_ms=1e3 * t["dense"],
                    sparse_ms=1e3 * t["sparse"],
                    speedup=t["speedup"],
                )
            )
            print(_fmt(results[-1]), flush=True)
    return results


def _fmt(r: dict) -> str:
    block = f"{r['block']}" if r["kind"].startswith("bsr") else "-"
    return (
        f"{r['kind']:<6} {r['m']:>6} {r['size']:>6} {block:>6} {100 * r['sparsity']:>8.0f} "
        f"{r['dense_ms']:>10.2f} {r['sparse_ms']:>10.2f} {r['speedup']:>8.2f}x"
    )


HEADER = (
    f"{'kind':<6} {'M':>6} {'K=N':>6} {'block':>6} {'sparse%':>8} {'dense_ms':>10} "
    f"{'sparse_ms':>10} {'speedup':>9}"
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--ms", type=int, nargs="*", default=None)
    p.add_argument("--blocks", type=int, nargs="*", default=None)
    p.add_argument("--sparsities", type=float, nargs="*", default=None)
    p.add_argument(
        "--grad",
        action="store_true",
        help="time forward + backward (dL/dx and dL/dW, as in a training step), BSR only",
    )
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    a = p.parse_args(argv)
    print(f"devices: {jax.devices()}  jax {jax.__version__}  preset {a.preset}")
    if a.preset == "cpu":
        from pallas_kernels.cpu import native

        reason = native.unavailable_reason()
        path = f"XLA ops ({reason})" if reason else "native FFI kernels"
        print(f"CPU BSR path for 64/128 blocks: {path}")
    print(HEADER, flush=True)
    results = run(a.preset, a.reps, a.ms, a.blocks, a.sparsities, a.grad)
    print("\nSummary (speedup = median over interleaved rounds of dense_time / sparse_time)")
    print(HEADER)
    for r in results:
        print(_fmt(r))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(
            json.dumps(
                dict(
                    preset=a.preset,
                    devices=str(jax.devices()),
                    jax=jax.__version__,
                    results=results,
                ),
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
