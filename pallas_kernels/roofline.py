"""Roofline model for the sparse matmuls: ideal time from FLOPs and bytes on a device.

A kernel's time is bounded below by ``max(flops / peak, bytes / bandwidth)`` (Williams,
Waterman & Patterson, "Roofline", CACM 2009). The figures here are vendors' datasheet peaks
(dense bf16 tensor-core / MXU FLOP/s, HBM bandwidth; no 2:4 sparsity) and serve two uses:
``benchmarks/roofline.py`` prints ideal and expected times per shape, and the ops' cost
models (:func:`pallas_kernels.block_sparse.tiles.dw_plan`, the N:M ``auto`` rule) compare
paths with them. Pure Python: no JAX, no device.

For ``y = x @ W`` with ``x (M, K)``, ``W (K, N)`` at block density ``d``:

* forward ``y = x W``: ``2 M K N d`` FLOPs; bytes ``M K + d K N + M N`` elements (+ int32
  index tables, negligible);
* ``dX = dY Wᵀ``: the same as the forward with ``K`` and ``N`` swapped;
* ``dW`` (stored blocks only): ``2 M K N d`` FLOPs; bytes ``M K + M N + d K N``.

Dense is the same with ``d = 1``.
"""

from __future__ import annotations

from typing import NamedTuple


class Device(NamedTuple):
    """Datasheet figures for one device (chip)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s
    bandwidth: float  # HBM bytes/s
    cores: int  # SMs (GPU) or TensorCores (TPU): programs needed to fill the device
    kind: str = "gpu"  # "gpu" or "tpu": which kernel flavour's traffic model applies


#: Sources: NVIDIA H100 SXM / H200 SXM / A100 SXM 80GB datasheets; Google Cloud TPU v5e, v5p,
#: v6e (Trillium) system-architecture pages (per chip).
DEVICES: dict[str, Device] = {
    "h100": Device("H100 SXM", 989e12, 3.35e12, 132),
    "h200": Device("H200 SXM", 989e12, 4.8e12, 132),
    "a100": Device("A100 SXM 80GB", 312e12, 2.039e12, 108),
    "v5e": Device("TPU v5e", 197e12, 0.819e12, 1, "tpu"),
    "v5p": Device("TPU v5p", 459e12, 2.765e12, 2, "tpu"),
    "v6e": Device("TPU v6e", 918e12, 1.64e12, 1, "tpu"),
}

#: Substrings of ``jax.Device.device_kind`` -> key in :data:`DEVICES` (first match wins).
_KINDS = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("v5 lite", "v5e"),
          ("v5e", "v5e"), ("v5p", "v5p"), ("v6", "v6e"))

PASSES = ("forward", "dX", "dW")


def device_for_kind(device_kind: str) -> Device | None:
    """The table entry for a ``jax.Device.device_kind`` string, or None if unknown."""
    for sub, key in _KINDS:
        if sub.lower() in device_kind.lower():
            return DEVICES[key]
    return None


class Cost(NamedTuple):
    """FLOPs and HBM bytes of one pass."""

    flops: float
    bytes: float

    def seconds(self, device: Device) -> float:
        """Roofline time: ``max(flops / peak, bytes / bandwidth)``."""
        return max(self.flops / device.peak_flops, self.bytes / device.bandwidth)


def matmul_cost(m: int, k: int, n: int, density: float, itemsize: int, pass_: str) -> Cost:
    """Cost of one pass of ``x (M, K) @ W (K, N)`` with block density ``density`` (1 = dense).

    ``pass_``: ``"forward"``, ``"dX"`` or ``"dW"`` (see the module docstring).
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    flops = 2.0 * m * k * n * density
    if pass_ == "forward":
        elems = m * k + density * k * n + m * n
    elif pass_ == "dX":
        elems = m * n + density * k * n + m * k
    else:
        elems = m * k + m * n + density * k * n
    return Cost(flops, elems * itemsize)


class Row(NamedTuple):
    """One line of the roofline table (times in seconds)."""

    pass_: str
    dense_s: float
    ideal_s: float  # sparse at the roofline
    expected_s: float  # sparse at the efficiency the kernel is expected to reach
    bound: str  # "compute" or "memory" (for the sparse ideal)

    @property
    def ideal_speedup(self) -> float:
        return self.dense_s / self.ideal_s if self.ideal_s else float("inf")

    @property
    def expected_speedup(self) -> float:
        return self.dense_s / self.expected_s if self.expected_s else float("inf")


#: Fraction of the roofline the block-sparse kernels are expected to reach relative to a
#: dense GEMM (which is taken to reach the roofline): index-table indirection and partial
#: tiles cost MMA efficiency (Gray et al. 2017 report ~70-80% of dense cuBLAS throughput per
#: stored block at 32-blocks; megablox/splash reach similar fractions on TPU). An assumption
#: to be replaced by the measured column, not a measurement.
SPARSE_EFFICIENCY = 0.7


def table_row(m: int, k: int, n: int, density: float, itemsize: int, pass_: str,
              device: Device, expected_s: float | None = None,
              efficiency: float = SPARSE_EFFICIENCY) -> Row:
    """Dense vs sparse roofline times of one pass (see :func:`matmul_cost`). ``expected_s``:
    a kernel model's estimate (``pallas_kernels.block_sparse.traffic``); by default the
    ideal FLOPs at ``efficiency`` of the peak, ideal bytes."""
    dense = matmul_cost(m, k, n, 1.0, itemsize, pass_).seconds(device)
    cost = matmul_cost(m, k, n, density, itemsize, pass_)
    ideal = cost.seconds(device)
    compute_bound = cost.flops / device.peak_flops >= cost.bytes / device.bandwidth
    if expected_s is None:
        expected_s = max(cost.flops / (device.peak_flops * efficiency),
                         cost.bytes / device.bandwidth)
    return Row(pass_, dense, ideal, expected_s, "compute" if compute_bound else "memory")


__all__ = ["DEVICES", "PASSES", "Cost", "Device", "Row", "device_for_kind", "matmul_cost",
           "table_row"]
