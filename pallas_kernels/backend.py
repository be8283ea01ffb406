"""Backend choice shared by the sparse matmul ops, kept behind the op wrappers (as in
``jax.experimental.pallas.ops``, whose jitted wrappers own backend, grid and tile sizes)."""

from __future__ import annotations

import jax

BACKENDS = ("auto", "pallas", "interpret", "interpret_gpu", "cpu", "reference")


def default_platform() -> str:
    """Platform of the default device (``"cpu"``, ``"gpu"`` or ``"tpu"``)."""
    return jax.devices()[0].platform


def resolve_backend(backend: str) -> str:
    """Map a backend name to an implementation: reference|cpu|tpu|gpu|interpret_tpu|
    interpret_gpu.

    ``auto``: the CPU fast path on CPU, the compiled Pallas kernel on GPU/TPU. ``pallas``:
    compiled kernel (Triton on GPU, Mosaic on TPU). ``interpret``: the TPU-style kernel in
    Pallas interpret mode (runs anywhere); ``interpret_gpu``: the GPU-style kernel interpreted.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    platform = default_platform()
    if backend == "auto":
        return "cpu" if platform == "cpu" else ("tpu" if platform == "tpu" else "gpu")
    if backend == "pallas":
        if platform not in ("gpu", "tpu"):
            raise ValueError(
                f"backend='pallas' needs a GPU or TPU, the default device is {platform!r}; "
                "use backend='interpret' to run the kernel on CPU"
            )
        return platform
    if backend == "interpret":
        return "interpret_tpu"
    return backend


def check_operand(x, shape: tuple[int, int], dtype) -> None:
    """``x`` must be ``(..., K)`` for a ``(K, N)`` matrix and share its dtype."""
    k = shape[0]
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x must have shape (..., {k}) to multiply a {shape} matrix, got {x.shape}"
        )
    if x.dtype != dtype:
        raise ValueError(f"dtype mismatch: x is {x.dtype} but w is {dtype}; cast one")
