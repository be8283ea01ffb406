"""The roofline model and ``benchmarks/roofline.py`` against hand computations (H100 SXM:
989 TFLOP/s bf16, 3.35 TB/s), and the table's CLI prints every requested row."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pallas_kernels.block_sparse.traffic import expected_seconds
from pallas_kernels.roofline import DEVICES, matmul_cost

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("roofline_bench", ROOT / "benchmarks/roofline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forward_4096_at_90_percent_by_hand():
    """x (8192, 4096) @ W (4096, 4096), 10% of the blocks, bf16.
    FLOPs: 2*8192*4096*4096*0.1 = 27.488e9 -> 27.79 us at the peak.
    Bytes: (8192*4096 x + 0.1*4096*4096 W + 8192*4096 y) * 2 = 137.57e6 -> 41.07 us.
    Dense: 274.88e9 FLOPs -> 277.94 us (its 167.77e6 bytes take 50.08 us): 6.77x ideal."""
    cost = matmul_cost(8192, 4096, 4096, 0.1, 2, "forward")
    assert cost.flops == pytest.approx(27_487_790_694.4)
    assert cost.bytes == pytest.approx(137_573_171.2)
    (row,) = [r for r in _benchmark().rows(DEVICES["h100"], 2)
              if (r["shape"], r["sparsity"], r["pass_"]) == ("4096^2", 0.9, "forward")]
    assert row["ideal_us"] == pytest.approx(137_573_171.2 / 3.35e6)
    assert row["dense_us"] == pytest.approx(274_877_906_944 / 989e6)
    assert row["ideal_x"] == pytest.approx(row["dense_us"] / row["ideal_us"])
    assert row["bound"] == "memory" and row["measured_x"] is None


def test_expected_gpu_forward_by_hand():
    """Same case as tiled: 128x256 tiles (2 block-columns), 64*16 = 1024 programs on 132 SMs
    = 8 waves at 1024/1056 fill -> MMA 27.488e9 / (989e12*0.7*0.9697) = 40.95 us. Bytes: x
    and y once, W once per 8-row-tile group (8192/(128*8) = 8 times): (33554432*2 +
    0.1*16777216*8) * 2 = 161.06e6 -> 48.08 us (memory-bound)."""
    got = expected_seconds(8192, 4096, 4096, 0.1, 128, 2, "forward", DEVICES["h100"])
    assert got == pytest.approx((33_554_432 * 2 + 0.1 * 16_777_216 * 8) * 2 / 3.35e12)


def test_cli_prints_the_requested_rows(capsys):
    _benchmark().main(["--device", "h100"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.split() and line.split()[0] in
             ("4096^2", "125M", "1.3B")]
    assert len(lines) == 7 * 3  # 3 sparsities of 4096^2 + 4 GPT layers, x forward/dX/dW
    assert "measured blank" in out
