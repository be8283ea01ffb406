"""Shared test fixtures. Reference data (real data sets, published figures) is in tests/data."""

from __future__ import annotations

import fcntl
import importlib.util
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import hypothesis
import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, its subprocesses and its pytest-xdist
# workers (they share the run's PYTEST_XDIST_TESTRUNUID): many tests compile the same tiny
# models from fresh closures, and XLA compiles dominate their run time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if _run:
        _cache = Path(tempfile.gettempdir()) / f"sparsejax-tests-xla-{_run}"
        _cache.mkdir(mode=0o700, exist_ok=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_cache)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsejax-tests-xla-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The tests compile for speed: they are compile-bound (tiny shapes, fresh closures, op-by-op
# calls), and XLA's backend optimizations and CPU MLIR fusion emitters cost more compile time
# than they save in run time (fast tier on 2 cores: 137 s -> 78 s; full suite 7.8 -> 4.6 min).
# They change how XLA:CPU compiles, not what: tolerances are set against float64 references,
# and bitwise checks compare programs compiled alike. Benchmarks and the README's commands run
# XLA's defaults. Set here, before jax is imported, so pytest-xdist workers and the tests'
# subprocesses inherit them.
_NO_FUSION_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_knows(flag: str) -> bool:
    """Whether the installed jaxlib's XLA has ``flag`` (XLA aborts on an unknown flag): its
    name is in jaxlib's binaries."""
    name = flag.lstrip("-").split("=")[0].encode()
    spec = importlib.util.find_spec("jaxlib")
    for lib in Path(spec.origin).parent.glob("*.so") if spec and spec.origin else ():
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(name) >= 0:
                return True
    return False


os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "") and _xla_knows(
        _NO_FUSION_EMITTERS):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_FUSION_EMITTERS}".strip()

# Property tests draw the same examples on every run (CI is reproducible); a test may still
# ask for more examples with its own @settings.
hypothesis.settings.register_profile("sparsejax", derandomize=True, deadline=None)
hypothesis.settings.load_profile("sparsejax")

REFERENCE_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """The reference-data folder ``tests/data`` (origins and licenses in its README.md)."""
    return REFERENCE_DATA


# Marks a test that runs the native CPU kernels' custom calls.
needs_native = pytest.mark.usefixtures("native_kernels")


@pytest.fixture
def native_kernels() -> None:
    """Skip where the native CPU kernels do not run here (no AVX-512F, an FFI header that
    differs from the handlers'); their first use compiles and registers them (seconds of
    numba), so this runs at setup of the tests that need them, never at collection."""
    from pallas_kernels.cpu import native

    reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


# A tiny dense run for run-dir tests (status, checkpoints, CLI errors): 8 steps, checkpoints
# at 2, 4, 6, 8.
TINY = ("size=tiny,model.n_ctx=32,train.seq_len=32,train.batch_size=4,eval.batch_size=4,"
        "eval.batches=1,eval.final_batches=1,train.warmup_steps=1,train.log_every=2,checkpoint.every=2,"
        "checkpoint.keep=4")
STEPS = 8


def tiny_config(**overrides):
    """The tiny config; keyword ``section__key=value`` overrides ``section.key``."""
    from sparsejax.run import configlib

    c = configlib.apply_arg(configlib.base(), TINY)
    c.train.steps = STEPS
    c.eval.every = STEPS
    for key, value in overrides.items():
        configlib.set_key(c, key.replace("__", "."), value)
    return c


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A completed 8-step dense run with checkpoints at steps 2, 4, 6, 8 (do not modify: copy
    it first). Trained once per test session: pytest-xdist workers share it through the
    session's temp folder, and the first worker to ask trains it under a file lock."""
    from sparsejax.run import experiment

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above every worker's own
    folder = root / "finished"
    with open(root / "finished.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died mid-training
            experiment.run(tiny_config(), str(folder / "run"), progress=False)
            (folder / "done").touch()
    return folder / "run"


def flat_tree(tree, prefix=""):
    """``(path, numpy leaf)`` pairs of a raw (dict/list-shaped) checkpoint tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flat_tree(v, f"{prefix}/{k}")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from flat_tree(v, f"{prefix}/{i}")
    else:
        yield prefix, np.asarray(tree)


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI on ``argv``: exit status 2 and exactly one ``sparsejax: error:`` line on
    stderr, no traceback; returns that line (output captured before the call is dropped)."""
    from sparsejax import cli

    capsys.readouterr()
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("sparsejax: error: ") and "Traceback" not in out.err + out.out
    return lines[0]
