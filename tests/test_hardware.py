"""MFU: the peak table, the CPU's measured peak, and ``mfu`` in metrics.jsonl."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from sparsejax.run import hardware, rundir


class FakeDevice(NamedTuple):
    platform: str
    device_kind: str


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA B200", 2250.0), ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0), ("TPU v5p", 459.0), ("TPU v6 lite", 918.0),
])
def test_peak_table(kind, tflops):
    assert hardware.table_peak(kind) == pytest.approx(tflops * 1e12)
    assert hardware.device_peak(FakeDevice("gpu", kind)).flops_per_s == pytest.approx(
        tflops * 1e12)


def test_mfu_sums_accelerators_and_counts_the_host_once():
    h100 = FakeDevice("gpu", "NVIDIA H100 80GB HBM3")
    # 8 H100s at 989 TFLOP/s each, 3.9564e15 FLOPs in 1 s: half of one device's peak x 8
    assert hardware.mfu(0.5 * 8 * 989e12, 1.0, [h100] * 8) == pytest.approx(0.5)
    assert hardware.mfu(1e12, 1.0, [FakeDevice("gpu", "Mystery GPU")]) is None  # never guessed
    assert hardware.mfu(1e12, 0.0, [h100]) is None
    cpu = FakeDevice("cpu", "cpu")
    peak = hardware.measured_cpu_peak()
    assert peak > 1e8  # a real measurement: at least 0.1 GFLOP/s
    assert hardware.mfu(peak, 1.0, [cpu] * 8) == pytest.approx(1.0)  # simulated devices: once


@pytest.mark.slow
def test_training_logs_mfu(finished_run):
    records = rundir.read_metrics(finished_run)
    assert records and all(0 < r["mfu"] < 1 for r in records)
    assert "mfu" in rundir.METRIC_FIELDS and "mfu" in rundir.TIMING_FIELDS
