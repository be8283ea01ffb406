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
