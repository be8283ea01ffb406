"""Package boundary: ``pallas_kernels`` (kernels, formats, layers) never imports ``sparsejax``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pallas_kernels_does_not_import_sparsejax():
    code = (
        "import importlib, pkgutil, sys\n"
        "import pallas_kernels\n"
        "walk = pkgutil.walk_packages(pallas_kernels.__path__, 'pallas_kernels.')\n"
        "names = [m.name for m in walk]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'sparsejax' or m.startswith('sparsejax.'))\n"
        "assert not bad, bad\n"
        "print(len(names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 15  # every module was imported
    sources = "\n".join(p.read_text() for p in (ROOT / "pallas_kernels").rglob("*.py"))
    assert "import sparsejax" not in sources and "from sparsejax" not in sources
