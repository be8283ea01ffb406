"""Roofline table for the block-sparse matmul: ideal time, expected speedup vs dense and, on
a device, the measured one, so every kernel change is judged against the limit.

For each shape, block sparsity and pass (forward ``y = xW``, ``dX = dY Wᵀ``, ``dW`` at the
stored blocks) it prints the dense roofline time, the sparse ideal (``max(FLOPs / peak,
bytes / bandwidth)``, :mod:`pallas_kernels.roofline`), the expected sparse time (the bytes
the kernels read as tiled, FLOPs at ``SPARSE_EFFICIENCY`` of the peak, wave and per-step
overheads: :mod:`pallas_kernels.block_sparse.traffic`; a model, not a measurement), the
ideal and expected speedups, and which roof binds the ideal. ``--measure`` (only on a
GPU/TPU) times the compiled kernels against XLA's dense matmul and fills the ``measured``
column; elsewhere it stays blank. Device figures: :data:`pallas_kernels.roofline.DEVICES`
(datasheet peaks).

    python benchmarks/roofline.py [--device h100] [--dtype bfloat16] [--block 128]
                                  [--measure] [--out roofline.json]

Default rows: 4096x4096 with 8192 tokens at 50/90/95% block sparsity; GPT-125M MLP layers
(768x3072, 3072x768) and GPT-1.3B MLP layers (2048x8192, 8192x2048) at 90%, 8192 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.block_sparse.traffic import expected_seconds  # noqa: E402
from pallas_kernels.roofline import DEVICES, PASSES, Device, Row, table_row  # noqa: E402

# (label, M tokens, K, N, block sparsity)
SHAPES: tuple[tuple[str, int, int, int, float], ...] = (
    ("4096^2", 8192, 4096, 4096, 0.5),
    ("4096^2", 8192, 4096, 4096, 0.9),
    ("4096^2", 8192, 4096, 4096, 0.95),
    ("125M up", 8192, 768, 3072, 0.9),
    ("125M down", 8192, 3072, 768, 0.9),
    ("1.3B up", 8192, 2048, 8192, 0.9),
    ("1.3B down", 8192, 8192, 2048, 0.9),
)
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def rows(device: Device, itemsize: int, block: int = 128, shapes=SHAPES) -> list[dict]:
    """One dict per (shape, sparsity, pass): the roofline figures (seconds and speedups)."""
    out = []
    for label, m, k, n, sparsity in shapes:
        for pass_ in PASSES:
            d = 1.0 - sparsity
            expected = expected_seconds(m, k, n, d, block, itemsize, pass_, device)
            r: Row = table_row(m, k, n, d, itemsize, pass_, device, expected)
            out.append(dict(shape=label, M=m, K=k, N=n, sparsity=sparsity, pass_=pass_,
                            dense_us=1e6 * r.dense_s, ideal_us=1e6 * r.ideal_s,
                            expected_us=1e6 * r.expected_s, ideal_x=r.ideal_speedup,
                            expected_x=r.expected_speedup, bound=r.bound, measured_x=None))
    return out


def measure(out: list[dict], dtype: str, block: int, reps: int = 20) -> None:
    """Fill ``measured_x`` (dense time / kernel time, medians) on a GPU or TPU."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import BSRMatrix

    if jax.devices()[0].platform not in ("gpu", "tpu"):
        raise SystemExit("--measure needs a GPU or TPU; the measured column stays blank here")
    impl = jax.devices()[0].platform

    def timed(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    rng = np.random.default_rng(0)
    for r in out:
        m, k, n, s = r["M"], r["K"], r["N"], r["sparsity"]
        grid = (k // block, n // block)
        mask = np.zeros(grid[0] * grid[1], bool)
        mask[rng.permutation(mask.size)[: round((1 - s) * mask.size)]] = True
        w = BSRMatrix.from_mask(rng.standard_normal((k, n)).astype(np.float32),
                                mask.reshape(grid), block=(block, block))
        lay, v = w.layout, w.values.astype(dtype)
        wd = BSRMatrix(v, lay).to_dense()
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
        sparse_fn, sparse_args, dense_fn, dense_args = _pass_fns(r["pass_"], lay, v, x, dy, wd,
                                                                 impl)
        r["measured_x"] = timed(dense_fn, *dense_args) / timed(sparse_fn, *sparse_args)


def _pass_fns(pass_: str, lay, v, x, dy, wd, impl: str):
    """``(kernel, its args, dense op, its args)`` of one pass, jitted; tiles by shape."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.block_sparse import ops

    if pass_ == "forward":
        return (jax.jit(lambda x, v: ops._forward(x, v, lay, impl, None)), (x, v),
                jax.jit(jnp.dot), (x, wd))
    if pass_ == "dX":
        vt = jnp.swapaxes(v[lay.transpose_perm], 1, 2)
        return (jax.jit(lambda g, vt: ops._forward(g, vt, lay.transposed, impl, None)), (dy, vt),
                jax.jit(lambda g, w: g @ w.T), (dy, wd))
    return (jax.jit(lambda x, g: ops._sddmm(x, g, lay, impl, None)), (x, dy),
            jax.jit(lambda x, g: x.T @ g), (x, dy))


HEADER = (f"{'shape':<10}{'sparse%':>8}{'pass':>8}{'dense_us':>10}{'ideal_us':>10}"
          f"{'exp_us':>9}{'ideal_x':>9}{'exp_x':>8}{'measured_x':>11}  bound")


def fmt(r: dict) -> str:
    measured = "" if r["measured_x"] is None else f"{r['measured_x']:.2f}"
    return (f"{r['shape']:<10}{100 * r['sparsity']:>8.0f}{r['pass_']:>8}{r['dense_us']:>10.1f}"
            f"{r['ideal_us']:>10.1f}{r['expected_us']:>9.1f}{r['ideal_x']:>9.2f}"
            f"{r['expected_x']:>8.2f}{measured:>11}  {r['bound']}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=sorted(DEVICES), default="h100")
    p.add_argument("--dtype", choices=sorted(ITEMSIZE), default="bfloat16")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--measure", action="store_true", help="time the kernels (GPU/TPU only)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    device = DEVICES[a.device]
    out = rows(device, ITEMSIZE[a.dtype], a.block)
    if a.measure:
        measure(out, a.dtype, a.block)
    print(f"{device.name}: {device.peak_flops / 1e12:.0f} TFLOP/s, "
          f"{device.bandwidth / 1e12:.2f} TB/s; {a.dtype}, {a.block}-blocks; "
          "measured blank = not run on a device")
    print(HEADER)
    for r in out:
        print(fmt(r))
    if a.out is not None:
        a.out.write_text(json.dumps(dict(device=device._asdict(), dtype=a.dtype, rows=out),
                                    indent=1))


if __name__ == "__main__":
    main()
