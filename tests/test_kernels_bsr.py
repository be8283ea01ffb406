"""Block-sparse matmul: Pallas kernels (interpret mode), CPU path and reference against an
independent float64 numpy product, gradients against jax.grad of the reference."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BSRMatrix, bsr_matmul
from pallas_kernels.block_sparse.reference import bsr_matmul_reference

SPARSITIES = (0.0, 0.5, 0.9, 1.0)  # fraction of zero blocks; 1.0 = all-zero matrix
SHAPES = (((64, 96), (16, 32)), ((128, 64), (32, 32)))  # ((K, N), block)
DTYPES = (jnp.float32, jnp.bfloat16)


def block_sparse(k, n, block, sparsity, seed=0, dtype=jnp.float32) -> np.ndarray:
    """Random (K, N) matrix with exactly round((1-sparsity)*blocks) non-zero blocks; inside a
    kept block a few entries are zero too (a block is dropped only if all of it is zero)."""
    rng = np.random.default_rng(seed)
    bk, bn = block
    nb = (k // bk) * (n // bn)
    keep = np.zeros(nb, bool)
    keep[rng.permutation(nb)[: round((1 - sparsity) * nb)]] = True
    mask = np.kron(keep.reshape(k // bk, n // bn), np.ones((bk, bn)))
    w = rng.standard_normal((k, n)) * mask * (rng.random((k, n)) > 0.1)
    return np.asarray(jnp.asarray(w, dtype))  # rounded to dtype (bf16 exact on the host)


def tolerance(dtype, ref) -> float:
    scale = float(np.abs(ref).max(initial=0.0)) + 1.0
    return (2e-2 if dtype == jnp.bfloat16 else 1e-5) * scale


def f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


# Kernels in interpret mode: every sparsity in f32, the non-trivial ones in bf16 (compiles
# dominate the cost); the CPU path: the full product. Shapes/blocks alternate across cases.
_CASES = [(jnp.float32, s) for s in SPARSITIES] + [(jnp.bfloat16, 0.5), (jnp.bfloat16, 0.9)]
FWD = (
    [
        (backend, dtype, sparsity, SHAPES[i % 2])
        for backend in ("interpret", "interpret_gpu")
        for i, (dtype, sparsity) in enumerate(_CASES)
    ]
    + [
        ("cpu", dtype, sparsity, SHAPES[i % 2])
        for i, (dtype, sparsity) in enumerate(itertools.product(DTYPES, SPARSITIES))
    ]
    + [("auto", jnp.float32, 0.0, SHAPES[0]), ("auto", jnp.float32, 0.9, SHAPES[1])]
)


@pytest.mark.parametrize(("backend", "dtype", "sparsity", "shape_block"), FWD)
def test_forward_matches_float64(backend, dtype, sparsity, shape_block):
    (k, n), block = shape_block
    w = block_sparse(k, n, block, sparsity, dtype=dtype)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, k)), dtype)
    matmul = jax.jit(functools.partial(bsr_matmul, backend=backend))
    y = matmul(x, BSRMatrix.from_dense(w, block=block))
    ref = f64(x) @ f64(w)
    assert y.shape == (2, 12, n) and y.dtype == dtype
    np.testing.assert_allclose(f64(y), ref, atol=tolerance(dtype, ref), rtol=0)


GRAD = [
    ("interpret", jnp.float32, 0.5),
    ("interpret", jnp.bfloat16, 0.9),
    ("interpret_gpu", jnp.float32, 0.9),
    ("interpret_gpu", jnp.bfloat16, 0.5),
    ("cpu", jnp.float32, 0.0),
    ("cpu", jnp.float32, 0.9),
    ("cpu", jnp.bfloat16, 0.5),
    ("cpu", jnp.float32, 1.0),
]


@pytest.mark.parametrize(("backend", "dtype", "sparsity"), GRAD)
def test_gradients_match_reference_autodiff(backend, dtype, sparsity):
    (k, n), block = SHAPES[0]
    w = BSRMatrix.from_dense(block_sparse(k, n, block, sparsity, dtype=dtype), block=block)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((20, k)), dtype)
    cot = jnp.asarray(rng.standard_normal((20, n)), dtype)

    def loss(fn):
        def f(x, v):
            y = fn(x, BSRMatrix(v, w.layout))
            return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32))

        return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w.values)

    dx, dv = loss(lambda x, m: bsr_matmul(x, m, backend=backend))
    rx, rv = loss(bsr_matmul_reference)
    assert dv.shape == w.values.shape and dv.dtype == dtype
    np.testing.assert_allclose(f64(dx), f64(rx), atol=tolerance(dtype, f64(rx)), rtol=0)
    np.testing.assert_allclose(f64(dv), f64(rv), atol=tolerance(dtype, f64(rv)), rtol=0)


def _native_or_skip():
    from pallas_kernels.cpu import native

    if native.unavailable_reason():
        pytest.skip(native.unavailable_reason())


# Every backend that runs on CPU; "auto" at 75% block density with 8x8 blocks takes the
# densify + GEMM path (guarded by an all-finite check on x).
CPU_BACKENDS = ["reference", "cpu", "cpu_xla", "cpu_native", "interpret", "interpret_gpu", "auto"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("block", "density"), [((16, 32), 0.5), ((8, 8), 0.75)])
def test_structural_zeros_contribute_nothing_not_even_nan(backend, block, density):
    """A NaN or inf in x reaches only the output columns with a stored block in its
    block-row, on every backend (as in other sparse libraries; dense x @ W would spread it)."""
    if backend == "cpu_native":
        _native_or_skip()
    k, n = 64, 96
    w = block_sparse(k, n, block, 1 - density, seed=5)
    a = BSRMatrix.from_dense(w, block=block)
    x = np.random.default_rng(6).standard_normal((4, k))
    x[0, 3], x[1, 17], x[2, 40], x[3, 41] = np.nan, np.inf, -np.inf, np.nan
    (bk, bn), ref = block, np.zeros((4, n))
    with np.errstate(invalid="ignore"):
        for r, c in zip(a.layout.rows, a.layout.cols, strict=True):
            rs, cs = slice(r * bk, (r + 1) * bk), slice(c * bn, (c + 1) * bn)
            ref[:, cs] += x[:, rs] @ w[rs, cs]
        assert np.isfinite(ref).sum() > np.isfinite(x @ w).sum()  # the case tells them apart
    y = jax.jit(functools.partial(bsr_matmul, backend=backend))(jnp.asarray(x, jnp.float32), a)
    np.testing.assert_allclose(f64(y), ref, atol=1e-4, rtol=0)  # NaN and inf where ref has them
    y = bsr_matmul_reference(jnp.asarray(x, jnp.float32), a)
    np.testing.assert_allclose(f64(y), ref, atol=1e-4, rtol=0)


def test_packing_drops_zero_blocks_and_roundtrips():
    (k, n), block = SHAPES[0]
    w = block_sparse(k, n, block, 0.5)
    m = BSRMatrix.from_dense(w, block=block)
    tiles = w.reshape(k // 16, 16, n // 32, 32)
    expected = int(np.any(tiles != 0, axis=(1, 3)).sum())
    assert m.layout.nnz == expected == 6  # 12 blocks, half kept
    np.testing.assert_array_equal(np.asarray(m.to_dense()), w)
    np.testing.assert_array_equal(np.asarray(m.transpose().to_dense()), w.T)
    # per-output-block index tables: column j's blocks are values[col_ptr[j]:col_ptr[j+1]]
    for j in range(n // 32):
        lo, hi = m.layout.col_ptr[j], m.layout.col_ptr[j + 1]
        rows = [r for r in range(k // 16) if np.any(tiles[r, :, j, :])]
        assert list(m.layout.rows[lo:hi]) == rows
    assert m.nbytes() == 6 * 16 * 32 * 4 + 4 * (6 + 3 + 1)


def test_pytree_passes_through_jit():
    (k, n), block = SHAPES[1]
    w = block_sparse(k, n, block, 0.5)
    m = BSRMatrix.from_dense(w, block=block)
    leaves, treedef = jax.tree_util.tree_flatten(m)
    assert len(leaves) == 1
    dense = jax.jit(lambda a: a.to_dense())(m)
    np.testing.assert_array_equal(np.asarray(dense), w)
    doubled = jax.jit(lambda a: jax.tree_util.tree_map(lambda v: 2 * v, a))(m)
    assert isinstance(doubled, BSRMatrix) and doubled.layout == m.layout


def test_errors_are_clear():
    w = np.ones((64, 96), np.float32)
    with pytest.raises(ValueError, match="not divisible by block"):
        BSRMatrix.from_dense(w, block=(24, 32))
    with pytest.raises(ValueError, match="2-D"):
        BSRMatrix.from_dense(np.ones((4, 4, 4)), block=(2, 2))
    m = BSRMatrix.from_dense(w, block=(16, 32))
    with pytest.raises(ValueError, match="dtype mismatch"):
        bsr_matmul(jnp.ones((3, 64), jnp.bfloat16), m)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\)"):
        bsr_matmul(jnp.ones((3, 65)), m)
    with pytest.raises(ValueError, match="backend must be one of"):
        bsr_matmul(jnp.ones((3, 64)), m, backend="cuda")
    if jax.devices()[0].platform == "cpu":
        with pytest.raises(ValueError, match="needs a GPU or TPU"):
            bsr_matmul(jnp.ones((3, 64)), m, backend="pallas")


ON_ACCELERATOR = jax.devices()[0].platform in ("gpu", "tpu")


@pytest.mark.skipif(
    not ON_ACCELERATOR,
    reason="compiled Pallas kernels need a GPU or TPU; "
    "on CPU the same logic runs in interpret mode above",
)
@pytest.mark.parametrize(("dtype", "sparsity"), list(itertools.product(DTYPES, SPARSITIES)))
def test_compiled_on_accelerator(dtype, sparsity):
    k, n, block = 512, 512, (128, 128)  # valid tiles for both Triton and Mosaic TPU
    w = BSRMatrix.from_dense(block_sparse(k, n, block, sparsity, dtype=dtype), block=block)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 100, k)), dtype)
    y = jax.jit(functools.partial(bsr_matmul, backend="pallas"))(x, w)
    ref = f64(x) @ f64(w.to_dense())
    tol = 5e-3 if dtype == jnp.float32 else 2e-2  # f32 dots may run as TF32 on GPUs
    scale = float(np.abs(ref).max(initial=0.0)) + 1.0
    np.testing.assert_allclose(f64(y), ref, atol=tol * scale, rtol=0)

    def grads(fn):
        def f(x, v):
            return jnp.sum(fn(x, BSRMatrix(v, w.layout)).astype(jnp.float32) ** 2)

        return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w.values)

    for got, want in zip(
        grads(lambda a, b: bsr_matmul(a, b, backend="pallas")),
        grads(bsr_matmul_reference),
        strict=True,
    ):
        scale = float(np.abs(f64(want)).max(initial=0.0)) + 1.0
        np.testing.assert_allclose(f64(got), f64(want), atol=2 * tol * scale, rtol=0)
