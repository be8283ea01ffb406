"""The guards around the native CPU kernels: the XLA FFI header check (fed modified copies of
the running jaxlib's header), the version the handlers announce, the FFI errors they return
on bad operands, dispatch by CPU features, and the private on-disk kernel cache."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("numba")

from conftest import needs_native  # noqa: E402

from pallas_kernels import BSRMatrix, bsr_matmul  # noqa: E402
from pallas_kernels.cpu import abi, cache, ffi, native  # noqa: E402

HEADER = abi.header_path()
BSR, SDDMM = "sparsejax_bsr_matmul_f32", "sparsejax_bsr_sddmm_f32"


def random_bsr(k, n, block, density, seed=0) -> BSRMatrix:
    rng = np.random.default_rng(seed)
    keep = rng.random((k // block[0], n // block[1])) < density
    keep.flat[0] = True
    w = rng.standard_normal((k, n)) * np.kron(keep, np.ones(block))
    return BSRMatrix.from_dense(w.astype(np.float32), block=block)


# ------------------------------------------------------------------ the C API header check
def test_running_jaxlib_header_matches():
    assert HEADER.is_file(), "jaxlib ships xla/ffi/api/c_api.h in its include folder"
    assert abi.check_header(HEADER) == []


def _edit(text: str, pattern: str, repl: str) -> str:
    out, count = re.subn(pattern, repl, text, count=1, flags=re.S)
    assert count == 1, f"the test's edit {pattern!r} no longer applies to this header"
    return out


# (name, regex, replacement, text expected in one of the reported problems)
EDITS = [
    (
        "field added in the call frame",
        r"(XLA_FFI_ExecutionContext\* ctx;)",
        r"\1\n  int64_t flags;",
        "XLA_FFI_CallFrame.stage",
    ),
    (
        "buffer fields reordered",
        r"(void\* data;)(\s*)(int64_t rank;)",
        r"\3\2\1",
        "XLA_FFI_Buffer.data",
    ),
    (
        "buffer field type changed",
        r"int64_t rank;",
        "int32_t rank;",
        "XLA_FFI_Buffer.rank (offset, size): header has (32, 4)",
    ),
    (
        "args struct grew in the middle",
        r"(struct XLA_FFI_Args \{.*?int64_t size;)",
        r"\1\n  int64_t capacity;",
        "XLA_FFI_CallFrame.args.args",
    ),
    (
        "major version bumped",
        r"#define XLA_FFI_API_MAJOR 0",
        "#define XLA_FFI_API_MAJOR 1",
        "API version",
    ),
    (
        "error codes renumbered",
        r"XLA_FFI_Error_Code_INVALID_ARGUMENT = 3",
        "XLA_FFI_Error_Code_INVALID_ARGUMENT = 4",
        "XLA_FFI_Error_Code_INVALID_ARGUMENT",
    ),
    (
        "member the parser cannot read",
        r"XLA_FFI_ExecutionStage stage;",
        "XLA_FFI_ExecutionStage stage[2];",
        "missing",
    ),
]


@pytest.mark.parametrize(("name", "pattern", "repl", "problem"), EDITS, ids=[e[0] for e in EDITS])
def test_header_check_fails_on_a_changed_header(tmp_path, name, pattern, repl, problem):
    path = tmp_path / "c_api.h"
    path.write_text(_edit(HEADER.read_text(), pattern, repl))
    problems = abi.check_header(path)
    assert problems and any(problem in p for p in problems), problems


def test_header_check_accepts_growth_at_the_end(tmp_path):
    """Structs only ever grow at the end (minor versions): the handlers still fit."""
    path = tmp_path / "c_api.h"
    text = _edit(HEADER.read_text(), r"(int64_t\* dims;[^\n]*)", r"\1\n  int64_t extra;")
    path.write_text(_edit(text, r"#define XLA_FFI_API_MINOR (\d+)", "#define XLA_FFI_API_MINOR 99"))
    assert abi.check_header(path) == []
    assert abi.check_header(tmp_path / "missing.h")[0].startswith("cannot read")


@pytest.fixture
def fresh_abi_check():
    abi.header_ok.cache_clear()
    yield
    abi.header_ok.cache_clear()


def test_header_mismatch_falls_back_to_xla_ops_with_one_warning(
    tmp_path, monkeypatch, fresh_abi_check
):
    bad = tmp_path / "c_api.h"
    bad.write_text(_edit(HEADER.read_text(), r"(void\* data;)(\s*)(int64_t rank;)", r"\3\2\1"))
    monkeypatch.setattr(abi, "header_path", lambda: bad)
    monkeypatch.setattr(native, "host_has_avx512", lambda: True)
    a = random_bsr(64, 96, (16, 32), 0.5)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 64)), jnp.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [bsr_matmul(x, a, backend=b) for b in ("cpu", "auto", "cpu")]
    ours = [w for w in caught if "XLA-ops path" in str(w.message)]
    assert len(ours) == 1 and "XLA_FFI_Buffer.data" in str(ours[0].message)
    hlo = jax.jit(lambda x: bsr_matmul(x, a, backend="cpu")).lower(x).as_text()
    assert BSR not in hlo
    ref = np.asarray(x, np.float64) @ np.asarray(a.to_dense(), np.float64)
    for y in ys:
        np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="FFI header"):
        bsr_matmul(x, a, backend="cpu_native")


class _ExtensionBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", ctypes.c_void_p)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("major", ctypes.c_int),
        ("minor", ctypes.c_int),
    ]


class _Metadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("api_version", _ApiVersion),
        ("traits", ctypes.c_uint32),
        ("state_type_id", ctypes.c_int64),
    ]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Args(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("size", ctypes.c_int64),
        ("types", ctypes.c_void_p),
        ("args", ctypes.c_void_p),
    ]


class _CallFrame(ctypes.Structure):
    """The start of XLA_FFI_CallFrame, laid out by ctypes (the platform's C rules)."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("api", ctypes.c_void_p),
        ("ctx", ctypes.c_void_p),
        ("stage", ctypes.c_int),
        ("args", _Args),
        ("rets", _Args),
    ]


def test_header_parser_lays_out_structs_like_the_c_compiler():
    parsed = abi.parse(HEADER.read_text())
    assert parsed.field("XLA_FFI_CallFrame.stage") == (_CallFrame.stage.offset, 4)
    assert (
        parsed.field("XLA_FFI_CallFrame.rets.size")[0] == _CallFrame.rets.offset + _Args.size.offset
    )
    assert parsed.field("XLA_FFI_Metadata.traits")[0] == _Metadata.traits.offset
    assert (
        parsed.field("XLA_FFI_Metadata_Extension.metadata")[0] == _MetadataExtension.metadata.offset
    )
    assert parsed.struct_size("XLA_FFI_Api_Version") == ctypes.sizeof(_ApiVersion)


def test_handler_announces_the_version_it_was_written_for():
    handler, _ = ffi.make_handler(native._bsr_check, native._bsr_run, native.BSR_ERRORS)
    meta = _Metadata(struct_size=ctypes.sizeof(_Metadata), traits=7)
    ext = _MetadataExtension(_ExtensionBase(ctypes.sizeof(_MetadataExtension), 1, None))
    ext.metadata = ctypes.pointer(meta)
    frame = _CallFrame(struct_size=ctypes.sizeof(_CallFrame), stage=0)
    frame.extension_start = ctypes.addressof(ext)
    call = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(handler.address)
    assert call(ctypes.addressof(frame)) == 0
    v = meta.api_version
    assert (v.struct_size, v.extension_start, v.major, v.minor) == (24, None, *abi.WRITTEN_FOR)
    assert meta.traits == 0
    # Not a metadata query and not the execute stage: nothing is read, nothing fails.
    frame.extension_start = None
    assert call(ctypes.addressof(frame)) == 0


@pytest.mark.slow
@needs_native
def test_xla_refuses_a_handler_announcing_another_api_version():
    """A handler announcing a version this XLA does not support is refused at registration;
    the ops then fall back to XLA ops with one warning (fresh process: registration is once)."""
    code = (
        "import warnings, jax, jax.numpy as jnp, numpy as np\n"
        "from pallas_kernels import BSRMatrix, bsr_matmul\n"
        "from pallas_kernels.cpu import ffi\n"
        "ffi.WRITTEN_FOR = (ffi.WRITTEN_FOR[0] + 1, 0)  # what make_handler announces\n"
        "w = BSRMatrix.from_dense(np.ones((32, 32), np.float32), block=(16, 16))\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    ys = [bsr_matmul(jnp.ones((2, 32)), w, backend='cpu') for _ in range(2)]\n"
        "msgs = [str(c.message) for c in caught if 'XLA-ops path' in str(c.message)]\n"
        "assert len(msgs) == 1 and 'API version' in msgs[0], msgs\n"
        "assert all(float(jnp.abs(y - 32).max()) == 0 for y in ys)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


# ------------------------------------------------------------------ FFI errors on bad operands
def _call(target, out_shape, *operands):
    out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
    return np.asarray(jax.ffi.ffi_call(target, out)(*(jnp.asarray(o) for o in operands)))


@needs_native
def test_handlers_return_ffi_errors_on_operands_they_cannot_run():
    a = random_bsr(64, 96, (16, 32), 0.5)
    native.bsr_matmul_native(jnp.ones((2, 64)), a.values, a.layout)  # registers both targets
    x, v = np.ones((3, 64), np.float32), np.asarray(a.values)
    rows, ptr = a.layout.rows.astype(np.int32), a.layout.col_ptr.astype(np.int32)
    signature, shapes = "operands must be", "shapes disagree"
    bad = [
        ("rows must index", (x, v, rows + 4, ptr)),
        ("col_ptr must rise", (x, v, rows, ptr[::-1].copy())),
        (signature, (x.astype(np.int32), v, rows, ptr)),  # dtype
        (signature, (x[0], v, rows, ptr)),  # rank
        (signature, (x, v, rows)),  # operand count
        (shapes, (np.ones((3, 50), np.float32), v, rows, ptr)),  # bk does not divide K
        (shapes, (x, np.ones((a.layout.nnz, 16, 8), np.float32), rows, ptr)),  # bn = 8
    ]
    for message, operands in bad:
        with pytest.raises(Exception, match=f"INVALID_ARGUMENT: {BSR}: {message}"):
            _call(BSR, (3, 96), *operands)
    cols = a.layout.cols.astype(np.int32)
    with pytest.raises(Exception, match=f"{SDDMM}: rows and cols must index"):
        _call(SDDMM, (a.layout.nnz, 16, 32), x, np.ones((3, 96), np.float32), rows, cols + 3)
    with pytest.raises(Exception, match=f"{SDDMM}: shapes disagree"):
        _call(SDDMM, (a.layout.nnz, 8, 32), x, np.ones((3, 96), np.float32), rows, cols)
    # The handlers are still fine afterwards.
    y = _call(BSR, (3, 96), x, v, rows, ptr)
    np.testing.assert_allclose(y, x @ np.asarray(a.to_dense()), atol=1e-4, rtol=0)


# ------------------------------------------------------------------ dispatch by CPU features
def test_avx512_detection_agrees_with_the_kernel():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or os.uname().machine != "x86_64":
        pytest.skip("no /proc/cpuinfo x86 flags to compare with")
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M).group(1).split()
    assert native.host_has_avx512() == ("avx512f" in flags)


def test_cpu_without_avx512_takes_the_xla_ops_path(monkeypatch):
    monkeypatch.setattr(native, "host_has_avx512", lambda: False)
    a = random_bsr(64, 96, (16, 32), 0.5, seed=3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((7, 64)), jnp.float32)
    for backend in ("cpu", "auto"):
        fn = jax.jit(lambda x, v, b=backend: bsr_matmul(x, BSRMatrix(v, a.layout), backend=b))
        assert BSR not in fn.lower(x, a.values).as_text()
        ref = np.asarray(x, np.float64) @ np.asarray(a.to_dense(), np.float64)
        np.testing.assert_allclose(np.asarray(fn(x, a.values)), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="AVX-512F"):
        bsr_matmul(x, a, backend="cpu_native")


# ------------------------------------------------------------------ private disk cache
@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    cache.kernel_cache_dir.cache_clear()
    yield lambda root: monkeypatch.setenv(cache.ENV, str(root))
    cache.kernel_cache_dir.cache_clear()


def test_kernel_cache_is_a_private_per_user_folder(tmp_path, monkeypatch, cache_env):
    monkeypatch.delenv(cache.ENV, raising=False)
    assert cache.cache_root() == Path.home() / ".cache" / "sparsejax"
    cache_env(tmp_path / "c")
    path = cache.kernel_cache_dir(Path(native.__file__))
    assert path is not None and path.parent.parent == tmp_path / "c"
    for p in (tmp_path / "c", path.parent, path):
        assert p.stat().st_mode & 0o777 == 0o700


def test_kernel_cache_refuses_a_folder_others_can_write(tmp_path, cache_env):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    cache_env(shared)
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        assert cache.kernel_cache_dir(Path(native.__file__)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.kernel_cache_dir(Path(native.__file__)) is None  # warned once
    assert list(shared.iterdir()) == []
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root can hand a folder to someone else
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 12345, -1)
        assert "owned by uid 12345" in cache.private_dir(other, "kernels")[1]


def test_kernel_cache_refuses_a_parent_others_can_write_without_the_sticky_bit(
        tmp_path, cache_env):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may rename the cache root away and put their own in its place
    cache_env(shared / "mine")
    with pytest.warns(RuntimeWarning, match=f"{shared} .*writable by group or others and "
                      "has no sticky bit"):
        assert cache.kernel_cache_dir(Path(native.__file__)) is None
    cache.kernel_cache_dir.cache_clear()
    shared.chmod(0o1777)  # like /tmp: only a folder's owner may rename it
    assert cache.kernel_cache_dir(Path(native.__file__)) is not None


def test_kernel_cache_root_is_not_followed_through_a_symlink(tmp_path, cache_env):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    cache_env(link)  # checked with lstat: the link, not what it points to today
    with pytest.warns(RuntimeWarning, match=f"{link} is a symbolic link"):
        assert cache.kernel_cache_dir(Path(native.__file__)) is None
    assert list(real.iterdir()) == []


@pytest.mark.slow
@needs_native
def test_a_second_process_loads_the_compiled_kernels_from_the_disk_cache(tmp_path):
    """The drivers and the handlers' checks and runs are compiled once per machine: a second
    process with the same cache folder compiles none of them again (numba writes a ``.nbc``
    file per compile)."""
    code = "from pallas_kernels.cpu import native\nassert native.unavailable_reason() is None\n"
    env = {**os.environ, cache.ENV: str(tmp_path)}
    root = Path(__file__).resolve().parents[1]

    def compiled() -> dict[str, float]:
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return {p.name: p.stat().st_mtime for p in tmp_path.rglob("*.nbc")}

    first = compiled()
    names = {name.split("-")[0] for name in first}
    assert names >= {f"native._{k}" for k in ("bsr_host", "sddmm_host", "bsr_check", "bsr_run",
                                             "sddmm_check", "sddmm_run")}, names
    assert compiled() == first
