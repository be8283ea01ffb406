"""The compiled (non-interpreted) kernels lower for GPU (Triton) and TPU (Mosaic) without a
device: ``lower(lowering_platforms=...)`` runs the full Pallas -> Triton IR / Mosaic MLIR
lowering on the host, catching unsupported ops, non-power-of-2 Triton loads and TPU tiling
violations. Running them needs a device (see ``test_*_compiled_on_accelerator`` and
``benchmarks/gpu_check.sh``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BSRMatrix, NMMatrix
from pallas_kernels.block_sparse import kernel as bk
from pallas_kernels.nm import kernel as nk
from pallas_kernels.nm.ops import _kernel_call

TARGET = {"cuda": "@__gpu$xla.gpu.triton", "tpu": "@tpu_custom_call"}
FLAVOUR = {"cuda": "gpu", "tpu": "tpu"}


def lowered_text(fn, *args, platform: str) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(0)
    mask = np.kron(np.array([[1, 0], [1, 1]]), np.ones((128, 128)))
    w = jnp.asarray(rng.standard_normal((256, 256)) * mask, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((128, 256)), jnp.bfloat16)
    return x, BSRMatrix.from_dense(w, block=(128, 128))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_bsr_kernels_lower(platform, operands):
    x, w = operands
    t = bk.BSRTiles(bm=128)
    fwd = bk.bsr_matmul_gpu if platform == "cuda" else bk.bsr_matmul_prefetch
    sddmm = bk.sddmm_gpu if platform == "cuda" else bk.sddmm_prefetch
    text = lowered_text(
        lambda a, v: fwd(a, v, layout=w.layout, tiles=t, interpret=False),
        x,
        w.values,
        platform=platform,
    )
    assert TARGET[platform] in text
    text = lowered_text(
        lambda a, d: sddmm(a, d, layout=w.layout, tiles=t, interpret=False),
        x,
        x,
        platform=platform,
    )
    assert TARGET[platform] in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_nm_kernel_lowers(platform):
    rng = np.random.default_rng(1)
    w = NMMatrix.from_dense(
        jnp.asarray(rng.standard_normal((1024, 256)), jnp.bfloat16), 2, 4, prune=True
    )
    x = jnp.ones((128, 1024), jnp.bfloat16)
    text = lowered_text(
        lambda a, v, c: _kernel_call(a, v, c, w.shape, 2, 4, FLAVOUR[platform], nk.NMTiles()),
        x,
        w.values,
        w.codes,
        platform=platform,
    )
    assert TARGET[platform] in text


# GPT-2 small (d 768, MLP 3072) and ~1B (d 2048, MLP 8192) layer shapes, 8192 tokens, 128-blocks
# at 10% block density: the whole forward + backward of bsr_matmul (forward, dX and dW
# kernels, tiles chosen by shape) lowers for both targets.
LAYER_SHAPES = {"gpt2_up": (768, 3072), "gpt2_down": (3072, 768), "1b_up": (2048, 8192)}


def _layout(k: int, n: int, density: float = 0.1) -> BSRMatrix:
    grid = (k // 128, n // 128)
    mask = np.zeros(grid[0] * grid[1], bool)
    mask[np.random.default_rng(k + n).permutation(mask.size)[: round(density * mask.size)]] = True
    return BSRMatrix.from_mask(np.zeros((k, n), np.float32), mask.reshape(grid), block=(128, 128))


@pytest.mark.parametrize("shape", sorted(LAYER_SHAPES))
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_bsr_layer_shapes_lower_forward_and_backward(platform, shape, monkeypatch):
    import pallas_kernels.backend
    from pallas_kernels import bsr_matmul

    monkeypatch.setattr(pallas_kernels.backend, "default_platform", lambda: FLAVOUR[platform])
    k, n = LAYER_SHAPES[shape]
    w = _layout(k, n)

    def loss(x, v):
        y = bsr_matmul(x, BSRMatrix(v, w.layout), backend="pallas")
        return jnp.sum(y.astype(jnp.float32))

    x = jax.ShapeDtypeStruct((8192, k), jnp.bfloat16)
    v = jax.ShapeDtypeStruct(w.values.shape, jnp.bfloat16)
    text = lowered_text(jax.value_and_grad(loss, argnums=(0, 1)), x, v, platform=platform)
    assert text.count(TARGET[platform]) == 3  # forward, dX, dW (split or per-block kernel)


@pytest.mark.parametrize(("shape", "kernel"), [("gpt2_up", {"cuda": True, "tpu": False}),
                                               ("1b_up", {"cuda": True, "tpu": True})])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_nm_auto_at_decode_lowers_the_kernel_where_it_tiles(platform, shape, kernel,
                                                            monkeypatch):
    """Decode (16 rows, memory-bound): ``auto`` runs the N:M kernel, except on TPU at K=768
    (K/m/P = 96 groups, not a multiple of 128), where it falls back to dense-masked."""
    import pallas_kernels.backend
    from pallas_kernels import nm_matmul

    monkeypatch.setattr(pallas_kernels.backend, "default_platform", lambda: FLAVOUR[platform])
    k, n = LAYER_SHAPES[shape]
    w = NMMatrix.from_dense(np.ones((k, n), np.float32), 2, 4, prune=True)
    args = (jax.ShapeDtypeStruct((16, k), jnp.bfloat16),
            jax.ShapeDtypeStruct(w.values.shape, jnp.bfloat16))
    text = lowered_text(lambda x, v: nm_matmul(x, NMMatrix(v, w.codes, w.shape, 2, 4)),
                        *args, platform=platform)
    assert (TARGET[platform] in text) == kernel[platform]
