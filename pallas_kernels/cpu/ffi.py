"""Numba-compiled XLA FFI handlers for the native CPU kernels.

A kernel registered as a typed XLA FFI custom call gets XLA's buffers directly, with no host
copies (``jax.pure_callback`` copies every operand and result, ~10 ms per 16 MB here). The
handler is a numba ``cfunc`` that reads the call frame through the XLA FFI C API
(``include/xla/ffi/api/c_api.h`` in jaxlib), whose structs only ever grow at the end; their
field offsets below hold for LP64 ABIs (x86-64 and aarch64 Linux/macOS), checked by
:func:`available`. Handlers answer XLA's metadata query with the API version of the running
jaxlib (read from its header) and run only at the execute stage. They do no input checking:
the Python wrappers validate shapes and dtypes before they emit the call.

Numba's default thread pool must not be entered by two threads at once, so every parallel
launch (from a handler on an XLA thread, or from Python) holds :data:`LOCK`, a CPython
thread lock that needs no GIL.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import jax
import numpy as np

try:
    import numba
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; checked by available()
    numba = None

# XLA_FFI_CallFrame: struct_size, extension_start, api, ctx, stage (enum, padded), args
# {struct_size, extension_start, size, types, args}, rets {struct_size, ..., rets}, ...
FRAME_EXTENSION, FRAME_STAGE, FRAME_NUM_ARGS, FRAME_ARGS, FRAME_RETS = 8, 32, 56, 72, 112
# XLA_FFI_Buffer: struct_size, extension_start, dtype (enum, padded), data, rank, dims
BUFFER_DATA, BUFFER_DIMS = 24, 40
# XLA_FFI_Extension_Base {struct_size, type, next}; XLA_FFI_Metadata_Extension adds metadata*;
# XLA_FFI_Metadata {struct_size, api_version {struct_size, extension_start, major, minor}, traits}
EXTENSION_TYPE, EXTENSION_METADATA_PTR = 8, 24
METADATA_VERSION, METADATA_TRAITS, VERSION_STRUCT_SIZE = 8, 32, 24
STAGE_EXECUTE, EXTENSION_METADATA = 3, 1

_api = ctypes.pythonapi
_api.PyThread_allocate_lock.restype = ctypes.c_void_p
# The lock handle travels as a pointer-sized integer (the same register in the C ABI), so the
# compiled handlers can bake it in as a constant.
LOCK: int = int(_api.PyThread_allocate_lock())
acquire_lock = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_ssize_t, ctypes.c_int)(
    ctypes.cast(_api.PyThread_acquire_lock, ctypes.c_void_p).value
)
release_lock = ctypes.CFUNCTYPE(None, ctypes.c_ssize_t)(
    ctypes.cast(_api.PyThread_release_lock, ctypes.c_void_p).value
)


def available() -> bool:
    """Whether native handlers can run here: numba imports and the ABI is LP64."""
    return numba is not None and ctypes.sizeof(ctypes.c_void_p) == 8


def api_version() -> tuple[int, int]:
    """(major, minor) of the XLA FFI C API of the running jaxlib, from its header."""
    header = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"
    text = header.read_text()
    found = [re.search(rf"#define XLA_FFI_API_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR")]
    if found[0] is None or found[1] is None:
        raise RuntimeError(f"no XLA_FFI_API_MAJOR/MINOR in {header}")
    return int(found[0].group(1)), int(found[1].group(1))


_registered: dict[str, object] = {}


def registered(name: str) -> bool:
    """Whether FFI target ``name`` was registered by :func:`register` in this process."""
    return name in _registered


def make_handler(body, major: int, minor: int):
    """A numba ``cfunc`` FFI handler: answers the metadata query with API ``(major, minor)``,
    ignores stages other than execute, and runs the njit function ``body(frame)`` holding
    :data:`LOCK`."""
    lock, acquire, release = LOCK, acquire_lock, release_lock

    @numba.cfunc(types.int64(types.int64))
    def handler(frame):
        if answer_metadata(frame, major, minor) or not is_execute(frame):
            return 0
        acquire(lock, 1)
        body(frame)
        release(lock)
        return 0

    return handler


def register(name: str, body) -> None:
    """Register :func:`make_handler` of ``body`` as CPU FFI target ``name`` once per process;
    the cfunc object is kept alive here."""
    if name not in _registered:
        handler = make_handler(body, *api_version())
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.address), platform="cpu")
        _registered[name] = handler


if numba is not None:

    def _load(ty):
        @intrinsic
        def load(typingctx, addr):
            def codegen(context, builder, signature, args):
                ptr_type = context.get_value_type(ty).as_pointer()
                return builder.load(builder.inttoptr(args[0], ptr_type))

            return ty(types.int64), codegen

        return load

    def _store(ty):
        @intrinsic
        def store(typingctx, addr, value):
            def codegen(context, builder, signature, args):
                ptr_type = context.get_value_type(ty).as_pointer()
                builder.store(args[1], builder.inttoptr(args[0], ptr_type))
                return context.get_dummy_value()

            return types.void(types.int64, ty), codegen

        return store

    def _pointer(ty):
        @intrinsic
        def pointer(typingctx, addr):
            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], context.get_value_type(ty).as_pointer())

            return types.CPointer(ty)(types.int64), codegen

        return pointer

    load_i64, load_i32 = _load(types.int64), _load(types.int32)
    store_i64, store_i32 = _store(types.int64), _store(types.int32)
    f32_pointer, i32_pointer = _pointer(types.float32), _pointer(types.int32)

    @numba.njit(inline="always")
    def answer_metadata(frame, major, minor):
        """If XLA is querying metadata, write the API version and no traits; returns whether
        it was such a query."""
        ext = load_i64(frame + FRAME_EXTENSION)
        if ext == 0 or load_i32(ext + EXTENSION_TYPE) != EXTENSION_METADATA:
            return False
        meta = load_i64(ext + EXTENSION_METADATA_PTR)
        version = meta + METADATA_VERSION
        store_i64(version, VERSION_STRUCT_SIZE)
        store_i64(version + 8, 0)
        store_i32(version + 16, np.int32(major))
        store_i32(version + 20, np.int32(minor))
        store_i32(meta + METADATA_TRAITS, np.int32(0))
        return True

    @numba.njit(inline="always")
    def arg(frame, i):
        """Address of the ``i``-th operand's XLA_FFI_Buffer."""
        return load_i64(load_i64(frame + FRAME_ARGS) + 8 * i)

    @numba.njit(inline="always")
    def ret(frame, i):
        """Address of the ``i``-th result's XLA_FFI_Buffer."""
        return load_i64(load_i64(frame + FRAME_RETS) + 8 * i)

    @numba.njit(inline="always")
    def dim(buffer, i):
        """Size of dimension ``i`` of a buffer."""
        return load_i64(load_i64(buffer + BUFFER_DIMS) + 8 * i)

    @numba.njit(inline="always")
    def data(buffer):
        """Address of a buffer's data."""
        return load_i64(buffer + BUFFER_DATA)

    @numba.njit(inline="always")
    def is_execute(frame):
        return load_i32(frame + FRAME_STAGE) == STAGE_EXECUTE
