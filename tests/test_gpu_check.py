"""The accelerator check's CPU mode (tiny shapes, Pallas interpret mode) runs and its
correctness rows pass: the script a GPU session runs first is itself tested here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_mode(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable,
           "ONLY": "correctness,jax-triton,fwd+bwd 128,train bsr"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [r["name"] for r in results["correctness"]]
    assert len(names) >= 15 and all(r["ok"] for r in results["correctness"])
    assert any(n.startswith("bsr") and n.endswith("dW") for n in names)
    assert any(n.startswith("nm 2:4") and n.endswith("dX") for n in names)
    row = results["kernels"][0]
    assert row["kind"] == "fwd+bwd" and {"dX_sparse_us", "dW_sparse_us"} <= set(row)
    (train,) = results["train"]
    assert train["step_ms"] > 0 and 0 < train["mfu"] < 1
    assert "jax_triton" in results
    assert results["layer_dtype"] == "bfloat16"  # a bf16 model stays bf16 through BSRLinear
