"""BSR kernels v2: every tiling path in interpret mode against float64, the TPU work list and
the GPU grouped order counted by hand, the tile table and the dW cost model on hand-worked
cases. Shapes are tiny; explicit tiles drive the tiling logic at small sizes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BSRMatrix, bsr_matmul
from pallas_kernels.block_sparse import kernel as bk
from pallas_kernels.block_sparse.format import BSRLayout
from pallas_kernels.block_sparse.tiles import (
    BSRTiles,
    choose_tiles,
    dw_plan,
    gpu_tiles,
    tpu_tiles,
)
from pallas_kernels.block_sparse.worklist import FIRST, LAST, VALID, padded_steps, work_items
from pallas_kernels.roofline import Device

K_, N_, BLOCK = 64, 96, (16, 16)  # a (4, 6) block grid


def f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def tol(dtype, ref) -> float:
    return (2e-2 if dtype == jnp.bfloat16 else 1e-5) * (float(np.abs(ref).max(initial=0)) + 1)


def operand(mask: np.ndarray, dtype, seed=0) -> BSRMatrix:
    """Random (K, N) weights on the given (4, 6) block mask, packed with ``from_mask``."""
    rng = np.random.default_rng(seed)
    w = np.asarray(jnp.asarray(rng.standard_normal((K_, N_)), dtype))
    return BSRMatrix.from_mask(w, mask, block=BLOCK)


MASKS = {
    # empty block-rows 1 and 3, empty block-columns 0, 2 and 5 (first and last)
    "empty_rows_cols": np.array([[0, 1, 0, 1, 1, 0], [0] * 6, [0, 1, 0, 0, 1, 0], [0] * 6], bool),
    "all": np.ones((4, 6), bool),
    "none": np.zeros((4, 6), bool),
    "one": np.eye(4, 6, 2, dtype=bool),
}
# (backend, tiles): GPU tiles of 2 and 3 block-columns in grouped order (group 2 over 3 row
# tiles: a partial last group), one block-column; TPU row tiles of 16 and 32 rows.
TILINGS = {
    "gpu_cols3": ("interpret_gpu", BSRTiles(bm=16, cols=3, group=2, splits=2, dw="split")),
    "gpu_cols2": ("interpret_gpu", BSRTiles(bm=16, cols=2, group=8, splits=1, dw="split")),
    "gpu_cols1_dense_dw": ("interpret_gpu", BSRTiles(bm=32, cols=1, dw="dense")),
    "tpu_rows16": ("interpret", BSRTiles(bm=16)),
    "tpu_rows32": ("interpret", BSRTiles(bm=32)),
}
_slow = pytest.mark.slow  # interpret-mode fwd + bwd: 3-8 s each on a shared CPU
CASES = [
    pytest.param("gpu_cols3", "empty_rows_cols", jnp.float32, 40, marks=_slow),
    pytest.param("gpu_cols3", "all", jnp.bfloat16, 33, marks=_slow),
    pytest.param("gpu_cols2", "one", jnp.float32, 17, marks=_slow),
    ("gpu_cols2", "none", jnp.float32, 5),
    pytest.param("gpu_cols1_dense_dw", "empty_rows_cols", jnp.bfloat16, 40, marks=_slow),
    pytest.param("tpu_rows16", "empty_rows_cols", jnp.float32, 40, marks=_slow),
    pytest.param("tpu_rows16", "all", jnp.bfloat16, 31, marks=_slow),
    pytest.param("tpu_rows32", "one", jnp.float32, 45, marks=_slow),
    ("tpu_rows32", "none", jnp.bfloat16, 7),
]


@pytest.mark.parametrize(("tiling", "mask", "dtype", "m"), CASES)
def test_tiling_paths_forward_and_grads_match_float64(tiling, mask, dtype, m):
    """Forward, dX and dW (stored blocks only) of each tiling path, odd M included."""
    backend, tiles = TILINGS[tiling]
    w = operand(MASKS[mask], dtype)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((m, K_)), dtype)
    cot = jnp.asarray(rng.standard_normal((m, N_)), dtype)

    def loss(x, v):
        y = bsr_matmul(x, BSRMatrix(v, w.layout), backend=backend, tiles=tiles)
        return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32)), y

    (_, y), (dx, dv) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        x, w.values)
    dense = f64(w.to_dense())
    ref_y = f64(x) @ dense
    ref_dx = f64(cot) @ dense.T
    full_dw = f64(x).T @ f64(cot)
    (bkk, bnn), lay = BLOCK, w.layout
    ref_dv = np.stack([full_dw[r * bkk:(r + 1) * bkk, c * bnn:(c + 1) * bnn]
                       for r, c in zip(lay.rows, lay.cols, strict=True)] or
                      [np.zeros(BLOCK)])[: lay.nnz]
    assert y.shape == (m, N_) and y.dtype == dtype and dv.shape == w.values.shape
    for got, ref in ((y, ref_y), (dx, ref_dx), (dv, ref_dv)):
        np.testing.assert_allclose(f64(got), ref, atol=tol(dtype, ref), rtol=0)


def test_work_list_counts_steps_by_hand_768x3072_at_10_percent():
    """GPT-125M MLP up-projection, 128-blocks: a (6, 24) block grid, 14 of 144 blocks stored
    (10%). Block-column 0 holds 3 blocks, columns 1-11 one each (row j % 6), 12-23 none.
    Padded design: 24 columns x 3 (the longest) = 72 steps per row tile; work list: 14
    stored + 12 empty columns = 26. Transposed (dX, 3072x768, a (24, 6) grid): W's rows
    hold {0,6}, {0,1,7}, {0,2,8}, {3,9}, {4,10}, {5,11}: padded 6 x 3 = 18, list 14."""
    mask = np.zeros((6, 24), bool)
    mask[[0, 1, 2], 0] = True
    for j in range(1, 12):
        mask[j % 6, j] = True
    cols, rows = np.nonzero(mask.T)
    lay = BSRLayout((768, 3072), (128, 128), rows.astype(np.int32), cols.astype(np.int32))
    assert lay.nnz == 14 and (padded_steps(lay), work_items(lay).steps) == (72, 26)
    assert (padded_steps(lay.transposed), work_items(lay.transposed).steps) == (18, 14)


def test_work_list_items_by_hand():
    """Columns: 0 empty, 1 holds rows {0, 2}, 2 empty, 3 holds row {1}."""
    mask = np.array([[0, 1, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]], bool)
    cols, rows = np.nonzero(mask.T)
    lay = BSRLayout((6, 8), (2, 2), rows.astype(np.int32), cols.astype(np.int32))
    items = work_items(lay)
    np.testing.assert_array_equal(items.col, [0, 1, 1, 2, 3])
    np.testing.assert_array_equal(items.block, [0, 0, 1, 1, 2])  # empty: repeat previous
    np.testing.assert_array_equal(items.xrow, [0, 0, 2, 2, 1])
    np.testing.assert_array_equal(
        items.flags, [FIRST | LAST, FIRST | VALID, LAST | VALID, FIRST | LAST,
                      FIRST | LAST | VALID])


def test_swizzle_visits_every_tile_once_in_groups():
    n_rows, n_cols, group = 5, 3, 2
    tiles = [tuple(int(t) for t in bk.swizzle(p, n_rows, n_cols, group))
             for p in range(n_rows * n_cols)]
    assert sorted(tiles) == [(i, j) for i in range(n_rows) for j in range(n_cols)]
    # the first group * n_cols programs cover row tiles 0-1 only, column by column
    assert tiles[:6] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert tiles[-3:] == [(4, 0), (4, 1), (4, 2)]  # the partial last group


def test_tile_table_by_shape():
    # GPU, bf16 128-blocks, 8192 tokens, N = 4096: 128 x 256 tiles (2 block-columns), 8 warps
    t = gpu_tiles(8192, 4096, (128, 128), 2)
    assert (t.bm, t.cols * 128, t.num_warps, t.num_stages) == (128, 256, 8, 3)
    # 32-blocks: 4 block-columns make a 128-wide tile; default choice is the same function
    t = choose_tiles("gpu", 8192, 4096, (32, 32), 2)
    assert t.cols * 32 == 128 and t == gpu_tiles(8192, 4096, (32, 32), 2)
    # decode (M = 8): bm shrinks to 16; the tile narrows until 132 SMs have programs
    t = gpu_tiles(8, 4096, (64, 64), 2)
    assert t.bm == 16 and t.cols == 1 and t.num_warps == 4
    # N = 768 (6 128-blocks): cols divides the block-columns
    assert 6 % gpu_tiles(8192, 768, (128, 128), 2).cols == 0
    # TPU: 512-2048 row tiles for long M, one 16-multiple tile for short M
    assert [tpu_tiles(m).bm for m in (8192, 4096, 1536, 600, 100)] == [2048, 2048, 512, 512, 112]
    assert choose_tiles("interpret_tpu", 1024, 768, (128, 128), 2).bm == 1024
    # 512-blocks in f32: 2048 rows would need 2*2048*1024*4 + 4*2048*512 = 20 MiB of VMEM
    assert tpu_tiles(8192, (512, 512), 4).bm == 1024


TOY = Device("toy", peak_flops=1e12, bandwidth=1e12, cores=10)


def test_dw_plan_hand_worked_split():
    """M=4096, K=N=1024, 128-blocks, 8 of 64 stored, bf16, toy device (1 TFLOP/s, 1 TB/s,
    10 cores). splits: ceil(20/8)=3 -> 4 (cap 4096/512=8); fill 32/10 -> 1.
    split: 2*4096*128*128*8 / (1e12*0.7) = 1.5339e-3 s (compute-bound; bytes 2.1e-5 s).
    dense: 2*4096*1024*1024 / 1e12 = 8.5899e-3 s. -> split."""
    plan = dw_plan(4096, 1024, 1024, (128, 128), 8, 2, TOY)
    assert plan.path == "split" and plan.splits == 4
    assert plan.split_s == pytest.approx(1_073_741_824 / 0.7e12)
    assert plan.dense_s == pytest.approx(8_589_934_592 / 1e12)


def test_dw_plan_hand_worked_dense():
    """M=256, K=N=256, 128-blocks, all 4 stored: splits 1 (256 < 512 tokens), fill 4/10.
    split: 2*256*128*128*4 / (1e12*0.7*0.4) = 1.1984e-4 s; dense: 2*256*256*256 / 1e12 =
    3.3554e-5 s (bytes 6.6e-7 s). -> dense (too few blocks to fill the device)."""
    plan = dw_plan(256, 256, 256, (128, 128), 4, 2, TOY)
    assert plan.path == "dense" and plan.splits == 1
    assert plan.split_s == pytest.approx(33_554_432 / 0.28e12)
    assert plan.dense_s == pytest.approx(33_554_432 / 1e12)


def test_gpu_auto_dw_follows_the_cost_model():
    """Without explicit tiles the GPU dW path is dw_plan's (H100 figures off-device): a
    fully stored 2x2 grid at 64 tokens is too little work -> the dense GEMM (no Pallas
    call for dW); the same layout at 10% of a larger grid -> the split kernel."""
    w = operand(MASKS["all"], jnp.float32)
    x = jnp.ones((64, K_), jnp.float32)

    def calls(w):
        f = functools.partial(bsr_matmul, backend="interpret_gpu")
        jaxpr = jax.make_jaxpr(jax.grad(lambda x, v: f(x, BSRMatrix(v, w.layout)).sum(),
                                        argnums=1))(x, w.values)
        return str(jaxpr).count("pallas_call")

    dense_dw = calls(w)  # forward + dX kernels, dW by a dense GEMM
    assert dense_dw >= 2 and calls(operand(MASKS["one"], jnp.float32)) == dense_dw + 1


@pytest.mark.parametrize(("backend", "tiles"), [
    ("interpret_gpu", BSRTiles(bm=16, cols=3, group=2)),  # 3 row tiles, partial last group
    ("interpret", BSRTiles(bm=16)),  # 3 row tiles over the work list, empty columns
])
def test_forward_tiling_fast(backend, tiles):
    """Fast-tier forward of the wide GPU tile and the TPU work list vs float64 (the full
    forward + backward matrix above is in the slow tier)."""
    w = operand(MASKS["empty_rows_cols"], jnp.float32)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((37, K_)), jnp.float32)
    y = jax.jit(functools.partial(bsr_matmul, backend=backend, tiles=tiles))(x, w)
    ref = f64(x) @ f64(w.to_dense())
    np.testing.assert_allclose(f64(y), ref, atol=tol(jnp.float32, ref), rtol=0)
