"""Numba-compiled XLA FFI handlers for the native CPU kernels.

A kernel registered as a typed XLA FFI custom call gets XLA's buffers directly, with no host
copies (``jax.pure_callback`` copies every operand and result, ~10 ms per 16 MB here). The
handler is a numba ``cfunc`` that reads the call frame through the XLA FFI C API at the byte
offsets of ``abi.py``. Three guards keep it from reading garbage:

* the handler announces :data:`abi.WRITTEN_FOR` (not the running jaxlib's version) when XLA
  queries its metadata, so an XLA that no longer supports that version refuses to register it;
* before the first registration, :func:`abi.header_ok` recomputes every offset, size and enum
  value used here from the running jaxlib's own ``c_api.h``; on any mismatch the kernels are
  not used (one warning, and the ops take the XLA-ops path);
* at execute time a handler checks operand count, buffer kinds, dtypes, ranks, dims and index
  tables (``check`` in :func:`make_handler`) and returns an ``INVALID_ARGUMENT`` FFI error
  instead of running on operands it cannot handle.

Numba's default thread pool must not be entered by two threads at once, so every parallel
launch (from a handler on an XLA thread, or from Python) holds :data:`LOCK`, a CPython
thread lock that needs no GIL.
"""

from __future__ import annotations

import ctypes

import jax

from pallas_kernels.cpu.abi import (
    API_ERROR_CREATE,
    BUFFER_DATA,
    BUFFER_DIMS,
    BUFFER_DTYPE,
    BUFFER_KIND,
    BUFFER_RANK,
    ERROR_ARGS_SIZE,
    ERROR_CODE_AT,
    ERROR_MESSAGE_AT,
    EXTENSION_METADATA,
    EXTENSION_METADATA_PTR,
    EXTENSION_TYPE,
    FRAME_API,
    FRAME_ARG_TYPES,
    FRAME_ARGS,
    FRAME_EXTENSION,
    FRAME_NUM_ARGS,
    FRAME_NUM_RETS,
    FRAME_RET_TYPES,
    FRAME_RETS,
    FRAME_STAGE,
    INVALID_ARGUMENT,
    METADATA_TRAITS,
    STAGE_EXECUTE,
    VERSION_EXT_AT,
    VERSION_MAJOR_AT,
    VERSION_MINOR_AT,
    VERSION_SIZE_AT,
    VERSION_STRUCT_SIZE,
    WRITTEN_FOR,
)

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; checked by available()
    numba = None

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
    """Whether native handlers can be compiled here: numba imports."""
    return numba is not None


_registered: dict[str, object] = {}


def registered(name: str) -> bool:
    """Whether FFI target ``name`` was registered by :func:`register` in this process."""
    return name in _registered


def make_handler(check, run, messages: tuple[str, ...]):
    """A numba ``cfunc`` FFI handler. It answers the metadata query with :data:`WRITTEN_FOR`,
    ignores stages other than execute, then calls the njit function ``check(frame) -> int``:
    ``0`` runs ``run(frame)`` holding :data:`LOCK`; ``i > 0`` returns an ``INVALID_ARGUMENT``
    FFI error with message ``messages[i - 1]``. Returns ``(cfunc, keep_alive)``."""
    buffers = tuple(ctypes.create_string_buffer(m.encode()) for m in messages)
    addresses = tuple(ctypes.addressof(b) for b in buffers)
    lock, acquire, release = LOCK, acquire_lock, release_lock
    major, minor = WRITTEN_FOR

    @numba.cfunc(types.int64(types.int64))
    def handler(frame):
        if answer_metadata(frame, major, minor) or not is_execute(frame):
            return 0
        code = check(frame)
        if code != 0:
            return error(frame, addresses[code - 1])
        acquire(lock, 1)
        run(frame)
        release(lock)
        return 0

    return handler, buffers


def register(name: str, check, run, messages: tuple[str, ...]) -> None:
    """Register :func:`make_handler` of ``(check, run, messages)`` as CPU FFI target ``name``
    once per process; the cfunc and its message buffers are kept alive here."""
    if name not in _registered:
        handler, buffers = make_handler(check, run, messages)
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.address), platform="cpu")
        _registered[name] = (handler, buffers)


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

    @intrinsic
    def _error_create(typingctx, create, message):
        """``create(&XLA_FFI_Error_Create_Args{..., message, INVALID_ARGUMENT})`` as an int."""

        def codegen(context, builder, signature, args):
            i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
            words = ir.ArrayType(i64, -(-ERROR_ARGS_SIZE // 8))  # 8-byte aligned storage
            raw = cgutils.alloca_once_value(builder, ir.Constant(words, None))
            base = builder.bitcast(raw, i8.as_pointer())

            def at(offset, ty):
                return builder.bitcast(
                    builder.gep(base, [ir.Constant(i32, offset)]), ty.as_pointer()
                )

            builder.store(ir.Constant(i64, ERROR_ARGS_SIZE), at(0, i64))
            builder.store(args[1], at(ERROR_MESSAGE_AT, i64))
            builder.store(ir.Constant(i32, INVALID_ARGUMENT), at(ERROR_CODE_AT, i32))
            fn_type = ir.FunctionType(i8.as_pointer(), [i8.as_pointer()])
            fn = builder.inttoptr(args[0], fn_type.as_pointer())
            err = builder.call(fn, [base])
            return builder.ptrtoint(err, i64)

        return types.int64(types.int64, types.int64), codegen

    @numba.njit(inline="always")
    def error(frame, message):
        """An ``INVALID_ARGUMENT`` XLA_FFI_Error* (as an int) carrying C string ``message``,
        made by the API of the frame (XLA always passes one at the execute stage)."""
        api = load_i64(frame + FRAME_API)
        if api == 0:
            return 0
        return _error_create(load_i64(api + API_ERROR_CREATE), message)

    @numba.njit(inline="always")
    def answer_metadata(frame, major, minor):
        """If XLA is querying metadata, write the API version and no traits; returns whether
        it was such a query."""
        ext = load_i64(frame + FRAME_EXTENSION)
        if ext == 0 or load_i32(ext + EXTENSION_TYPE) != EXTENSION_METADATA:
            return False
        meta = load_i64(ext + EXTENSION_METADATA_PTR)
        store_i64(meta + VERSION_SIZE_AT, VERSION_STRUCT_SIZE)
        store_i64(meta + VERSION_EXT_AT, 0)
        store_i32(meta + VERSION_MAJOR_AT, numba.int32(major))
        store_i32(meta + VERSION_MINOR_AT, numba.int32(minor))
        store_i32(meta + METADATA_TRAITS, numba.int32(0))
        return True

    @numba.njit(inline="always")
    def is_execute(frame):
        return load_i32(frame + FRAME_STAGE) == STAGE_EXECUTE

    @numba.njit(inline="always")
    def buffer(frame, i):
        """Address of the XLA_FFI_Buffer of operand ``i`` (results follow the operands)."""
        n_args = load_i64(frame + FRAME_NUM_ARGS)
        if i < n_args:
            return load_i64(load_i64(frame + FRAME_ARGS) + 8 * i)
        return load_i64(load_i64(frame + FRAME_RETS) + 8 * (i - n_args))

    @numba.njit(inline="always")
    def signature_ok(frame, dtypes, ranks, n_args):
        """Whether the frame holds ``n_args`` operands and ``len(dtypes) - n_args`` results,
        all buffers, the ``i``-th of XLA_FFI_DataType ``dtypes[i]`` and rank ``ranks[i]``."""
        n_rets = len(dtypes) - n_args
        if load_i64(frame + FRAME_NUM_ARGS) != n_args or load_i64(frame + FRAME_NUM_RETS) != n_rets:
            return False
        arg_types, ret_types = load_i64(frame + FRAME_ARG_TYPES), load_i64(frame + FRAME_RET_TYPES)
        for i in range(len(dtypes)):
            kind = (
                load_i32(arg_types + 4 * i)
                if i < n_args
                else load_i32(ret_types + 4 * (i - n_args))
            )
            b = buffer(frame, i)
            if kind != BUFFER_KIND or load_i32(b + BUFFER_DTYPE) != dtypes[i]:
                return False
            if load_i64(b + BUFFER_RANK) != ranks[i]:
                return False
        return True

    @numba.njit(inline="always")
    def dim(buf, i):
        """Size of dimension ``i`` of a buffer."""
        return load_i64(load_i64(buf + BUFFER_DIMS) + 8 * i)

    @numba.njit(inline="always")
    def dims3(buf):
        """The three dimensions of a rank-3 buffer."""
        return dim(buf, 0), dim(buf, 1), dim(buf, 2)

    @numba.njit(inline="always")
    def data(buf):
        """Address of a buffer's data."""
        return load_i64(buf + BUFFER_DATA)
