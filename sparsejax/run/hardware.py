"""Peak compute of the devices a run trains on, for model FLOPs utilisation (MFU).

MFU (Chowdhery et al. 2022, "PaLM", appendix B) is the model's FLOPs per second over the
devices' peak: here the run's own count (:mod:`sparsejax.run.accounting`: 3x the forward,
``6N`` per token plus attention, sparse matmuls scaled by density) over the dense bf16 peak of
every device in the mesh. Accelerator peaks are the vendors' dense (no 2:4 sparsity) bf16
figures; on CPU there is no such figure, so the peak is measured once per process: the best
of a few jitted f32 ``1024^3`` matmuls on all of the process's CPU threads.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

#: (substring of ``device.device_kind``, dense bf16 TFLOP/s per device). First match wins, so
#: more specific names come first. Sources: NVIDIA H100/H200/A100/B200 and Google Cloud TPU
#: datasheets (SXM / per-chip figures).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("TPU v6", 918.0),  # v6e (Trillium)
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),  # v5e's device_kind
    ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)


class Peak(NamedTuple):
    """A device's peak FLOP/s and where the figure comes from."""

    flops_per_s: float
    source: str  # "table: H100" or "measured: f32 1024^3 matmul"


def table_peak(device_kind: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of a device kind from :data:`PEAK_BF16_TFLOPS`, or None."""
    for sub, tflops in PEAK_BF16_TFLOPS:
        if sub.lower() in device_kind.lower():
            return tflops * 1e12
    return None


@functools.cache
def measured_cpu_peak(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` jitted f32 ``n^3`` matmuls on the CPU (measured once)."""
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))  # compile
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def device_peak(device: Any) -> Peak | None:
    """The peak of ``device``: the table for GPUs and TPUs, measured for a CPU; None for an
    accelerator the table does not know (MFU is then not reported, never guessed)."""
    kind = getattr(device, "device_kind", "") or ""
    if device.platform == "cpu":
        return Peak(measured_cpu_peak(), "measured: f32 1024^3 matmul")
    peak = table_peak(kind)
    return None if peak is None else Peak(peak, f"table: {kind}")


def mfu(flops: float, seconds: float, devices: list[Any]) -> float | None:
    """``flops`` done in ``seconds`` over the summed peak of ``devices`` (None when a device's
    peak is unknown or no time passed). CPU devices (real, or simulated with
    ``--xla_force_host_platform_device_count``) share the host's cores: they count once, at
    the measured peak."""
    if seconds <= 0 or not devices:
        return None
    accelerators = [d for d in devices if d.platform != "cpu"]
    peaks = [device_peak(d) for d in accelerators] or [device_peak(devices[0])]
    if any(p is None for p in peaks):
        return None
    return flops / seconds / sum(p.flops_per_s for p in peaks)
