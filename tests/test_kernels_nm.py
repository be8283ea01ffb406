"""N:M matmul: in-kernel decompression (interpret mode), CPU path and reference against an
independent float64 numpy product; gradients against jax.grad of the reference; storage."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import NMMatrix, nm_matmul
from pallas_kernels.nm.reference import nm_matmul_reference


def nm_sparse(k, n_out, n, m, seed=0, dtype=jnp.float32, extra_zeros=0.0) -> np.ndarray:
    """Random (K, N) matrix with exactly n random survivors per group of m along K (fewer
    where ``extra_zeros`` knocks survivors out), built without the library's pruning."""
    rng = np.random.default_rng(seed)
    keep = np.argsort(rng.random((k // m, m, n_out)), axis=1) < n  # n True per group
    w = rng.standard_normal((k, n_out)) * keep.reshape(k, n_out)
    w *= rng.random((k, n_out)) >= extra_zeros
    return np.asarray(jnp.asarray(w, dtype))


def f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def tolerance(dtype, ref) -> float:
    scale = float(np.abs(ref).max(initial=0.0)) + 1.0
    return (2e-2 if dtype == jnp.bfloat16 else 1e-5) * scale


# (n, m, K, N): 2:4 with two K tiles (exercises the code slot switch), 1:4, 4:8 (uint16).
PATTERNS = ((2, 4, 128, 48), (1, 4, 64, 32), (4, 8, 64, 32))
FWD = [
    ("interpret", jnp.float32, PATTERNS[0]),
    ("interpret", jnp.bfloat16, PATTERNS[2]),
    ("interpret_gpu", jnp.bfloat16, PATTERNS[0]),
    ("interpret_gpu", jnp.float32, PATTERNS[1]),
    ("cpu", jnp.float32, PATTERNS[0]),
    ("cpu", jnp.bfloat16, PATTERNS[1]),
    ("cpu", jnp.float32, PATTERNS[2]),
]


@pytest.mark.parametrize(("backend", "dtype", "pattern"), FWD)
def test_forward_matches_float64(backend, dtype, pattern):
    n, m, k, cols = pattern
    w = nm_sparse(k, cols, n, m, dtype=dtype, extra_zeros=0.2)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 7, k)), dtype)
    y = jax.jit(functools.partial(nm_matmul, backend=backend))(x, NMMatrix.from_dense(w, n, m))
    ref = f64(x) @ f64(w)
    assert y.shape == (3, 7, cols) and y.dtype == dtype
    np.testing.assert_allclose(f64(y), ref, atol=tolerance(dtype, ref), rtol=0)


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        ("interpret", jnp.float32),
        ("interpret_gpu", jnp.bfloat16),
        ("cpu", jnp.float32),
        ("cpu", jnp.bfloat16),
    ],
)
def test_gradients_match_reference_autodiff(backend, dtype):
    n, m, k, cols = PATTERNS[0]
    w = NMMatrix.from_dense(nm_sparse(k, cols, n, m, dtype=dtype), n, m)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((20, k)), dtype)
    cot = jnp.asarray(rng.standard_normal((20, cols)), jnp.float32)

    def grads(fn):
        def f(x, v):
            y = fn(x, NMMatrix(v, w.codes, w.shape, n, m))
            return jnp.sum(y.astype(jnp.float32) * cot)

        return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w.values)

    dx, dv = grads(lambda x, a: nm_matmul(x, a, backend=backend))
    rx, rv = grads(nm_matmul_reference)
    np.testing.assert_allclose(f64(dx), f64(rx), atol=tolerance(dtype, f64(rx)), rtol=0)
    np.testing.assert_allclose(f64(dv), f64(rv), atol=tolerance(dtype, f64(rv)), rtol=0)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2), (4, 4)])
def test_roundtrip_and_layout(n, m):
    w = nm_sparse(64, 24, n, m, seed=n + m, extra_zeros=0.3)
    a = NMMatrix.from_dense(w, n, m)
    assert a.values.shape == (64 * n // m, 24)
    np.testing.assert_array_equal(np.asarray(a.to_dense()), w)
    assert np.asarray(a.indices()).max() < m
    # plane-major values: row t*G + g is the t-th kept slot of group g
    g = 64 // m
    vals = np.asarray(a.values).reshape(n, g, 24)
    np.testing.assert_allclose(vals.sum(axis=0), w.reshape(g, m, 24).sum(axis=1), atol=1e-6)


def test_prune_keeps_largest_magnitudes():
    w = np.array([[1.0, -5.0], [-3.0, 0.5], [0.2, 4.0], [2.5, -0.1]], np.float32)  # K=4, N=2
    a = NMMatrix.from_dense(w, 2, 4, prune=True)
    expected = np.array([[0.0, -5.0], [-3.0, 0.0], [0.0, 4.0], [2.5, 0.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(a.to_dense()), expected)


def test_compressed_bytes_2_4_bf16():
    w = nm_sparse(256, 64, 2, 4, dtype=jnp.bfloat16)
    a = NMMatrix.from_dense(w, 2, 4)
    # values: half of dense; codes: 4 bits per group of 4 -> 1/16 of the bf16 bytes
    assert a.codes.dtype == jnp.uint8 and a.codes.shape == (32, 64)
    assert a.nbytes() == 256 * 64 + 32 * 64
    assert a.nbytes() / a.dense_nbytes() == pytest.approx(0.5625) and a.nbytes() <= 0.57 * (
        a.dense_nbytes()
    )


def test_pytree_passes_through_jit():
    w = nm_sparse(64, 16, 2, 4)
    a = NMMatrix.from_dense(w, 2, 4)
    assert len(jax.tree_util.tree_leaves(a)) == 2
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda b: b.to_dense())(a)), w)


def test_errors_are_clear():
    w = np.ones((64, 8), np.float32)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        NMMatrix.from_dense(w, 5, 4)
    with pytest.raises(ValueError, match="must divide K"):
        NMMatrix.from_dense(np.ones((66, 8)), 2, 4)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        NMMatrix.from_dense(w, 2, 4)
    a = NMMatrix.from_dense(w, 2, 4, prune=True)
    with pytest.raises(ValueError, match="dtype mismatch"):
        nm_matmul(jnp.ones((2, 64), jnp.bfloat16), a)
    with pytest.raises(ValueError, match="backend must be one of"):
        nm_matmul(jnp.ones((2, 64)), a, backend="triton")


ON_ACCELERATOR = jax.devices()[0].platform in ("gpu", "tpu")


@pytest.mark.skipif(
    not ON_ACCELERATOR,
    reason="compiled Pallas kernels need a GPU or TPU; "
    "on CPU the same logic runs in interpret mode above",
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_compiled_on_accelerator(dtype, n, m):
    k, cols = 2048, 256  # 128-multiple tiles for every pattern (TPU lane rule)
    w = NMMatrix.from_dense(nm_sparse(k, cols, n, m, dtype=dtype), n, m)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 50, k)), dtype)
    y = jax.jit(functools.partial(nm_matmul, backend="pallas"))(x, w)
    ref = f64(x) @ f64(w.to_dense())
    tol = 5e-3 if dtype == jnp.float32 else 2e-2  # f32 dots may run as TF32 on GPUs
    scale = float(np.abs(ref).max(initial=0.0)) + 1.0
    np.testing.assert_allclose(f64(y), ref, atol=tol * scale, rtol=0)


def test_auto_rule_kernel_only_where_memory_bound():
    """The compressed kernel does dense arithmetic, so it wins only on bytes. H100 bf16,
    4096x4096 at 2:4: per row of x, 2*4096*4096 FLOPs = 33.55 MFLOP cost the kernel
    33.55e6 / (989e12 * 0.7) = 48.47 ps and dense 33.93 ps; dense-masked pays the
    decompression once, (16.78 MB kept + 2.10 MB codes (4 bits per group of 4) + 33.55 MB
    dense) / 3.35 TB/s = 15.65 us. Past the memory-bound range the kernel loses 14.54 ps
    per row, so it wins for M < 15.65 us / 14.54 ps = 1076 rows: 16..1072 on a 16-row grid."""
    from pallas_kernels.nm.ops import kernel_wins
    from pallas_kernels.roofline import DEVICES

    h100 = DEVICES["h100"]
    wins = [m for m in range(16, 8193, 16) if kernel_wins(m, (4096, 4096), 2, 4, 2, h100, "gpu")]
    assert wins == list(range(16, 1073, 16))


def test_tpu_auto_falls_back_at_k768_and_pallas_says_why(monkeypatch):
    """GPT-2 small's K=768 with 2:4: 96 groups per code plane, not a multiple of 128, so the
    TPU kernel cannot tile it; ``auto`` takes the dense-masked path (no Pallas call) and is
    exact, ``pallas`` raises naming the field."""
    import pallas_kernels.backend

    monkeypatch.setattr(pallas_kernels.backend, "default_platform", lambda: "tpu")
    w = NMMatrix.from_dense(nm_sparse(768, 32, 2, 4), 2, 4)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 768)), jnp.float32)
    auto = functools.partial(nm_matmul, backend="auto")
    assert "pallas_call" not in str(jax.make_jaxpr(auto)(x, w))
    np.testing.assert_allclose(f64(auto(x, w)), f64(x) @ f64(w.to_dense()), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="128-multiples: groups/tile"):
        nm_matmul(x, w, backend="pallas")
