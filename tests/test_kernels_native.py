"""Native CPU block-sparse kernels (numba micro-kernels behind XLA FFI custom calls) and the
XLA-ops CPU path, against float64 numpy products. The safety checks around them (C API
header, CPU features, handler errors, disk cache) are in test_kernels_cpu_safety.py."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("numba")

from conftest import needs_native  # noqa: E402

from pallas_kernels import BSRMatrix, bsr_matmul  # noqa: E402
from pallas_kernels.cpu import native  # noqa: E402
from pallas_kernels.cpu.bsr import bsr_matmul_xla  # noqa: E402


def random_bsr(k, n, block, density, seed=0):
    rng = np.random.default_rng(seed)
    bk, bn = block
    keep = rng.random((k // bk, n // bn)) < density
    keep.flat[0] = density > 0  # at least one block unless all-zero is asked for
    w = rng.standard_normal((k, n)) * np.kron(keep, np.ones(block))
    return w.astype(np.float32)


# (M, K, N, block, density): row tails (M not a multiple of the 6/12/24-row tiles, M=1,
# M over one, two, three and four 256-row tasks with ragged tails), column tiles 64/32/16
# (bn 64, 128, 32, 48, 16), empty block-columns.
CASES = [
    (37, 128, 192, (32, 64), 0.5),
    (300, 256, 256, (64, 64), 0.3),
    (13, 256, 256, (128, 128), 0.6),
    (1, 64, 96, (16, 32), 0.9),
    (50, 96, 144, (32, 48), 0.4),
    (25, 64, 64, (16, 16), 0.2),
    (7, 128, 128, (64, 64), 0.0),
    # several 256-row tasks per block-column with ragged tails of different lengths
    (600, 64, 128, (16, 64), 0.5),
    (1031, 32, 96, (32, 32), 0.6),
    (769, 64, 64, (64, 16), 0.7),
]


@needs_native
@pytest.mark.parametrize(("m", "k", "n", "block", "density"), CASES)
def test_ffi_call_matches_float64(m, k, n, block, density):
    w = random_bsr(k, n, block, density, seed=3)
    a = BSRMatrix.from_dense(w, block=block)
    x = np.random.default_rng(4).standard_normal((m, k)).astype(np.float32)
    y = jax.jit(lambda x, v: native.bsr_matmul_native(x, v, a.layout))(jnp.asarray(x), a.values)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5 * (np.abs(ref).max() + 1), rtol=0)


# (M, K, N, block, density) for dW: all three column tiles (4/8/16-row tiles), M = 1 and odd.
SDDMM_CASES = [
    (37, 128, 192, (32, 64), 0.5),
    (1, 64, 96, (16, 32), 0.9),
    (50, 96, 144, (32, 48), 0.4),
    (129, 256, 256, (128, 128), 0.6),
    (301, 64, 96, (16, 48), 0.5),  # ten 32-row chunks and a 13-row tail per tile
]


@needs_native
@pytest.mark.parametrize(("m", "k", "n", "block", "density"), SDDMM_CASES)
def test_sddmm_matches_float64(m, k, n, block, density):
    a = BSRMatrix.from_dense(random_bsr(k, n, block, density, seed=11), block=block)
    rng = np.random.default_rng(12)
    x, dy = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (m, n)))
    full = x.astype(np.float64).T @ dy.astype(np.float64)
    (bk, bn), lay = block, a.layout
    pairs = zip(lay.rows, lay.cols, strict=True)
    ref = np.stack([full[r * bk : (r + 1) * bk, c * bn : (c + 1) * bn] for r, c in pairs])
    tol = 1e-5 * (np.abs(ref).max() + 1)
    y = jax.jit(lambda x, d: native.sddmm_native(x, d, lay))(jnp.asarray(x), jnp.asarray(dy))
    assert y.shape == (lay.nnz, bk, bn)
    np.testing.assert_allclose(np.asarray(y), ref, atol=tol, rtol=0)


@needs_native
def test_cpu_backward_runs_native_sddmm():
    w = BSRMatrix.from_dense(random_bsr(64, 96, (16, 32), 0.5), block=(16, 32))

    def loss(x, v):
        return jnp.sum(bsr_matmul(x, BSRMatrix(v, w.layout), backend="cpu"))

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jnp.ones((5, 64)), w.values).as_text()
    assert "sparsejax_bsr_sddmm_f32" in text and "sparsejax_bsr_matmul_f32" in text


@needs_native
def test_cpu_backend_uses_the_custom_call_and_xla_ops_otherwise():
    w16 = BSRMatrix.from_dense(random_bsr(64, 64, (16, 16), 0.5), block=(16, 16))
    w8 = BSRMatrix.from_dense(random_bsr(64, 64, (8, 8), 0.5), block=(8, 8))
    x = jnp.ones((4, 64))

    def hlo(w):
        return (
            jax.jit(lambda x, v: bsr_matmul(x, BSRMatrix(v, w.layout), backend="cpu"))
            .lower(x, w.values)
            .as_text()
        )

    assert "sparsejax_bsr_matmul_f32" in hlo(w16)
    assert "sparsejax_bsr_matmul_f32" not in hlo(w8)  # 8-wide blocks: XLA ops


def dense_grads(x, w, cot):
    """float64 numpy ``dL/dx`` and ``dL/dW`` of ``sum((x @ w) * cot)``."""
    return cot @ w.T, x.T @ cot


@pytest.mark.parametrize("path", ["cpu_native", "cpu_xla"])
@pytest.mark.parametrize(("block", "density"), [((16, 32), 0.5), ((32, 64), 0.3), ((64, 16), 0.9)])
def test_each_cpu_path_matches_float64(path, block, density):
    """Each CPU path forced by name: forward, dX and dW (at the stored blocks) against float64
    numpy; ``cpu_native`` must put the custom calls in the program, ``cpu_xla`` none."""
    if path == "cpu_native" and native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    k, n = 128, 192
    w = random_bsr(k, n, block, density, seed=21)
    a = BSRMatrix.from_dense(w, block=block)
    rng = np.random.default_rng(22)
    x, cot = rng.standard_normal((33, k)), rng.standard_normal((33, n))

    def loss(x, v):
        y = bsr_matmul(x, BSRMatrix(v, a.layout), backend=path)
        return jnp.sum(y * jnp.asarray(cot, jnp.float32)), y

    fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    xj = jnp.asarray(x, jnp.float32)
    (dx, dv), y = fn(xj, a.values)
    x64, w64 = np.asarray(xj, np.float64), w.astype(np.float64)
    rx, rw = dense_grads(x64, w64, cot)
    (bk, bn), lay = block, a.layout
    rv = np.stack(
        [
            rw[r * bk : (r + 1) * bk, c * bn : (c + 1) * bn]
            for r, c in zip(lay.rows, lay.cols, strict=True)
        ]
    )
    for got, want in ((y, x64 @ w64), (dx, rx), (dv, rv)):
        np.testing.assert_allclose(
            np.asarray(got), want, atol=1e-4 * (np.abs(want).max() + 1), rtol=0
        )
    hlo = fn.lower(xj, a.values).as_text()
    assert ("sparsejax_bsr_matmul_f32" in hlo) == (path == "cpu_native")
    assert ("sparsejax_bsr_sddmm_f32" in hlo) == (path == "cpu_native" and native.fits(*block))


@pytest.mark.parametrize("block", [(8, 8), (16, 24), (32, 32)])
def test_xla_path_matches_float64(block):
    w = random_bsr(64, 96, block, 0.5, seed=5)
    a = BSRMatrix.from_dense(w, block=block)
    x = np.random.default_rng(6).standard_normal((9, 64)).astype(np.float32)
    y = jax.jit(lambda x, v: bsr_matmul_xla(x, v, a.layout))(jnp.asarray(x), a.values)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5 * (np.abs(ref).max() + 1), rtol=0)
    z = bsr_matmul(jnp.asarray(x), a, backend="cpu")  # also the route for non-16 blocks
    np.testing.assert_allclose(np.asarray(z), ref, atol=1e-5 * (np.abs(ref).max() + 1), rtol=0)


@needs_native
def test_vmap_and_bf16_through_the_custom_call():
    w = random_bsr(64, 128, (32, 64), 0.5, seed=7)
    a = BSRMatrix.from_dense(w, block=(32, 64))
    xs = np.random.default_rng(8).standard_normal((3, 5, 64)).astype(np.float32)
    ys = jax.vmap(lambda x: bsr_matmul(x, a, backend="cpu"))(jnp.asarray(xs))
    ref = xs.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(np.asarray(ys), ref, atol=1e-4, rtol=0)
    ab = BSRMatrix.from_dense(jnp.asarray(w, jnp.bfloat16), block=(32, 64))
    xb = jnp.asarray(xs[0], jnp.bfloat16)
    yb = bsr_matmul(xb, ab, backend="cpu")
    refb = np.asarray(xb, np.float64) @ np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float64), refb, atol=0.1, rtol=2e-2)


@needs_native
def test_concurrent_calls_are_serialised_not_crashed():
    """Two independent custom calls in one program (XLA may run them at once) and calls from
    several Python threads: numba's thread pool is entered by one launch at a time."""
    w = random_bsr(256, 256, (64, 64), 0.5, seed=9)
    a = BSRMatrix.from_dense(w, block=(64, 64))
    rng = np.random.default_rng(10)
    x1, x2 = (jnp.asarray(rng.standard_normal((200, 256)), jnp.float32) for _ in range(2))
    both = jax.jit(lambda p, q: (bsr_matmul(p, a, backend="cpu"), bsr_matmul(q, a, backend="cpu")))
    y1, y2 = both(x1, x2)
    w64 = w.astype(np.float64)
    ref1, ref2 = np.asarray(x1, np.float64) @ w64, np.asarray(x2, np.float64) @ w64
    np.testing.assert_allclose(np.asarray(y1), ref1, atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(y2), ref2, atol=1e-3, rtol=0)
    errors: list[float] = []
    one = jax.jit(lambda p: bsr_matmul(p, a, backend="cpu"))

    def work(i):
        for _ in range(5):
            out = np.asarray(both(x1, x2)[0] if i % 2 else one(x1))
            errors.append(float(np.abs(out - ref1).max()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 20 and max(errors) < 1e-3


def test_native_rejects_bad_operands():
    a = BSRMatrix.from_dense(random_bsr(64, 64, (16, 16), 0.5), block=(16, 16))
    with pytest.raises(ValueError, match=r"x must be \(M, 64\)"):
        native.bsr_matmul_native(jnp.ones((4, 32)), a.values, a.layout)
    b = BSRMatrix.from_dense(random_bsr(64, 64, (8, 8), 0.5), block=(8, 8))
    with pytest.raises(ValueError, match="multiples of 16"):
        native.bsr_matmul_native(jnp.ones((4, 64)), b.values, b.layout)
    c = BSRMatrix.from_dense(random_bsr(48, 64, (24, 32), 0.5), block=(24, 32))
    with pytest.raises(ValueError, match="sides must be multiples of 16"):
        native.sddmm_native(jnp.ones((4, 48)), jnp.ones((4, 64)), c.layout)
    with pytest.raises(ValueError, match=r"dy \(M, 64\)"):
        native.sddmm_native(jnp.ones((4, 64)), jnp.ones((5, 64)), a.layout)
