"""Guards on the suite itself: in CI the tests that reproduce published numbers cannot be
skipped away by a missing ``../shared/data`` folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_allocation_reference_tests(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(SPARSEJAX_SHARED_DATA=str(tmp_path / "missing"), JAX_PLATFORMS="cpu")
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_allocation.py", "-k", "reference"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_missing_reference_data_fails_in_ci_and_skips_elsewhere(tmp_path):
    ci = run_allocation_reference_tests(tmp_path, ci=True)
    assert ci.returncode != 0, ci.stdout[-2000:]
    assert "CI must have it" in ci.stdout and "error" in ci.stdout.splitlines()[-1]
    local = run_allocation_reference_tests(tmp_path, ci=False)
    assert local.returncode == 0, local.stdout[-2000:]
    assert "skipped" in local.stdout.splitlines()[-1] and "passed" not in local.stdout
