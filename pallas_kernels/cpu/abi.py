"""The XLA FFI C API layout the native handlers were written for, checked against jaxlib's.

The handlers (``ffi.py``) read XLA's call frame at the byte offsets below, read from
``xla/ffi/api/c_api.h`` of API version :data:`WRITTEN_FOR` for LP64 ABIs (x86-64 and aarch64
Linux/macOS). Before they are first registered, :func:`header_ok` parses the running
jaxlib's own header (:func:`header_path`) and recomputes every offset, size and enum value
used; on any difference the ops take the XLA-ops path, after one warning.

The parser knows just enough C for that header: ``struct`` bodies whose members are scalars,
pointers (function pointers included), enums, typedef'd scalars or earlier structs, with
``_XLA_FFI_API_STRUCT_FIELD(T)`` members and ``XLA_FFI_DEFINE_STRUCT_TRAITS`` struct sizes.
A declaration it does not understand is reported as a difference, never guessed at.
"""

from __future__ import annotations

import ctypes
import functools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import jax

# The XLA FFI API version whose c_api.h (jaxlib 0.10.2) the constants below were read from.
WRITTEN_FOR = (0, 3)
# Byte offsets (LP64) of the C API fields the handlers read or write.
FRAME_EXTENSION, FRAME_API, FRAME_STAGE = 8, 16, 32
FRAME_NUM_ARGS, FRAME_ARG_TYPES, FRAME_ARGS = 56, 64, 72
FRAME_NUM_RETS, FRAME_RET_TYPES, FRAME_RETS = 96, 104, 112
BUFFER_DTYPE, BUFFER_DATA, BUFFER_RANK, BUFFER_DIMS = 16, 24, 32, 40
EXTENSION_TYPE, EXTENSION_METADATA_PTR = 8, 24
VERSION_SIZE_AT, VERSION_EXT_AT, VERSION_MAJOR_AT, VERSION_MINOR_AT = 8, 16, 24, 28
METADATA_TRAITS, API_ERROR_CREATE, ERROR_MESSAGE_AT, ERROR_CODE_AT = 32, 48, 16, 24
VERSION_STRUCT_SIZE, ERROR_ARGS_SIZE = 24, 28
STAGE_EXECUTE, EXTENSION_METADATA, BUFFER_KIND = 3, 1, 1
DTYPE_S32, DTYPE_F32, INVALID_ARGUMENT = 4, 11, 3

# What each constant is in c_api.h, for check_header: field -> (offset, size), struct ->
# XLA_FFI_DEFINE_STRUCT_TRAITS size, enumerator -> value.
FIELDS = {
    "XLA_FFI_CallFrame.extension_start": (FRAME_EXTENSION, 8),
    "XLA_FFI_CallFrame.api": (FRAME_API, 8),
    "XLA_FFI_CallFrame.stage": (FRAME_STAGE, 4),
    "XLA_FFI_CallFrame.args.size": (FRAME_NUM_ARGS, 8),
    "XLA_FFI_CallFrame.args.types": (FRAME_ARG_TYPES, 8),
    "XLA_FFI_CallFrame.args.args": (FRAME_ARGS, 8),
    "XLA_FFI_CallFrame.rets.size": (FRAME_NUM_RETS, 8),
    "XLA_FFI_CallFrame.rets.types": (FRAME_RET_TYPES, 8),
    "XLA_FFI_CallFrame.rets.rets": (FRAME_RETS, 8),
    "XLA_FFI_Buffer.dtype": (BUFFER_DTYPE, 4),
    "XLA_FFI_Buffer.data": (BUFFER_DATA, 8),
    "XLA_FFI_Buffer.rank": (BUFFER_RANK, 8),
    "XLA_FFI_Buffer.dims": (BUFFER_DIMS, 8),
    "XLA_FFI_Extension_Base.type": (EXTENSION_TYPE, 4),
    "XLA_FFI_Metadata_Extension.metadata": (EXTENSION_METADATA_PTR, 8),
    "XLA_FFI_Metadata.api_version.struct_size": (VERSION_SIZE_AT, 8),
    "XLA_FFI_Metadata.api_version.extension_start": (VERSION_EXT_AT, 8),
    "XLA_FFI_Metadata.api_version.major_version": (VERSION_MAJOR_AT, 4),
    "XLA_FFI_Metadata.api_version.minor_version": (VERSION_MINOR_AT, 4),
    "XLA_FFI_Metadata.traits": (METADATA_TRAITS, 4),
    "XLA_FFI_Api.XLA_FFI_Error_Create": (API_ERROR_CREATE, 8),
    "XLA_FFI_Error_Create_Args.struct_size": (0, 8),
    "XLA_FFI_Error_Create_Args.extension_start": (8, 8),
    "XLA_FFI_Error_Create_Args.message": (ERROR_MESSAGE_AT, 8),
    "XLA_FFI_Error_Create_Args.errc": (ERROR_CODE_AT, 4),
}
STRUCT_SIZES = {
    "XLA_FFI_Api_Version": VERSION_STRUCT_SIZE,
    "XLA_FFI_Error_Create_Args": ERROR_ARGS_SIZE,
}
ENUMS = {
    "XLA_FFI_ExecutionStage_EXECUTE": STAGE_EXECUTE,
    "XLA_FFI_Extension_Metadata": EXTENSION_METADATA,
    "XLA_FFI_ArgType_BUFFER": BUFFER_KIND,
    "XLA_FFI_RetType_BUFFER": BUFFER_KIND,
    "XLA_FFI_DataType_S32": DTYPE_S32,
    "XLA_FFI_DataType_F32": DTYPE_F32,
    "XLA_FFI_Error_Code_INVALID_ARGUMENT": INVALID_ARGUMENT,
}


def header_path() -> Path:
    """The running jaxlib's ``xla/ffi/api/c_api.h`` (shipped in its ``include`` folder)."""
    try:
        include = Path(jax.ffi.include_dir())
    except AttributeError:  # pragma: no cover - older jax: the folder inside jaxlib
        import jaxlib

        include = Path(jaxlib.__file__).parent / "include"
    return include / "xla" / "ffi" / "api" / "c_api.h"


def check_header(path: str | Path) -> list[str]:
    """Differences between the C API declared in header ``path`` and what the handlers were
    written for (:data:`WRITTEN_FOR`, :data:`FIELDS`, :data:`STRUCT_SIZES`, :data:`ENUMS`);
    empty when the handlers can run against it."""
    try:
        parsed = parse(Path(path).read_text())
    except OSError as err:
        return [f"cannot read the XLA FFI header: {err}"]
    problems = []
    version = tuple(parsed.defines.get(f"XLA_FFI_API_{k}", -1) for k in ("MAJOR", "MINOR"))
    if version[0] != WRITTEN_FOR[0] or version[1] < WRITTEN_FOR[1]:
        problems.append(f"API version {version} cannot serve handlers written for {WRITTEN_FOR}")
    checks = [(f"{p} (offset, size)", v, lambda p=p: parsed.field(p)) for p, v in FIELDS.items()]
    checks += [(f"{s} size", v, lambda s=s: parsed.struct_size(s)) for s, v in STRUCT_SIZES.items()]
    checks += [(e, v, lambda e=e: parsed.enums[e]) for e, v in ENUMS.items()]
    for what, expected, get in checks:
        try:
            found = get()
        except (HeaderError, KeyError) as err:
            found = f"missing ({err})"
        if found != expected:
            problems.append(f"{what}: header has {found}, handlers expect {expected}")
    return problems


@functools.cache
def header_ok() -> bool:
    """Whether the ABI is LP64 and :func:`check_header` finds nothing in the running
    jaxlib's header; warns once when it does not."""
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    problems = check_header(header_path())
    if problems:
        warnings.warn(
            f"native CPU kernels disabled, using the XLA-ops path: the XLA FFI C API of this "
            f"jaxlib ({header_path()}) differs from the one they were written for: "
            + "; ".join(problems),
            RuntimeWarning,
            stacklevel=2,
        )
    return not problems


# (size, alignment) of the scalar types of an LP64 ABI (x86-64 and aarch64 Linux/macOS).
_SCALARS = {
    **dict.fromkeys(("char", "int8_t", "uint8_t", "bool"), 1),
    **dict.fromkeys(("int16_t", "uint16_t", "short"), 2),
    **dict.fromkeys(("int", "unsigned", "int32_t", "uint32_t", "float"), 4),
    **dict.fromkeys(("long", "size_t", "int64_t", "uint64_t", "double", "intptr_t"), 8),
}
POINTER = 8


class HeaderError(ValueError):
    """A declaration the parser does not understand, or a missing struct or field."""


@dataclass
class Header:
    """Parsed header: ``defines`` (integer macros), ``enums`` (enumerator values), ``structs``
    (member declarations, parsed when a layout is asked for, so an unusual member only
    matters in a struct that is used) and ``traits`` (struct -> last field of
    ``XLA_FFI_DEFINE_STRUCT_TRAITS``)."""

    defines: dict[str, int] = field(default_factory=dict)
    enums: dict[str, int] = field(default_factory=dict)
    structs: dict[str, list[str]] = field(default_factory=dict)
    traits: dict[str, str] = field(default_factory=dict)
    scalars: dict[str, int] = field(default_factory=lambda: dict(_SCALARS))

    def size_align(self, type_name: str) -> tuple[int, int]:
        """``(sizeof, alignof)`` of a member type."""
        if type_name == "*":
            return POINTER, POINTER
        if type_name in self.scalars:
            return self.scalars[type_name], self.scalars[type_name]
        if type_name in self.structs:
            offsets, size, align = self._layout(type_name)
            return size, align
        raise HeaderError(f"unknown type {type_name!r}")

    def _layout(self, struct: str) -> tuple[dict[str, tuple[int, str]], int, int]:
        offset, align, offsets = 0, 1, {}
        for name, type_name in map(_member, self.structs[struct]):
            size, a = self.size_align(type_name)
            offset = -(-offset // a) * a
            offsets[name] = (offset, type_name)
            offset += size
            align = max(align, a)
        return offsets, -(-offset // align) * align, align

    def field(self, path: str) -> tuple[int, int]:
        """``(offset, size)`` in bytes of a dotted member path such as
        ``"XLA_FFI_CallFrame.args.size"`` (offsets of nested members add up)."""
        struct, *names = path.split(".")
        total, size = 0, 0
        for name in names:
            if struct not in self.structs:
                raise HeaderError(f"no struct {struct!r} (for {path})")
            offsets = self._layout(struct)[0]
            if name not in offsets:
                raise HeaderError(f"struct {struct} has no field {name!r} (for {path})")
            offset, struct = offsets[name]
            total += offset
            size = self.size_align(struct)[0]
        return total, size

    def struct_size(self, struct: str) -> int:
        """``<struct>_STRUCT_SIZE``: end of the last field named by its struct traits."""
        if struct not in self.traits:
            raise HeaderError(f"no XLA_FFI_DEFINE_STRUCT_TRAITS for {struct}")
        offset, size = self.field(f"{struct}.{self.traits[struct]}")
        return offset + size


def _member(decl: str) -> tuple[str, str]:
    """``(name, type)`` of one member declaration (type ``"*"`` for any pointer)."""
    macro = re.fullmatch(r"_XLA_FFI_API_STRUCT_FIELD\(\s*(\w+)\s*\)", decl)
    if macro:
        return macro.group(1), "*"
    fn_ptr = re.fullmatch(r"[\w\s*]+\(\s*\*\s*(\w+)\s*\)\s*\(.*\)", decl)
    if fn_ptr:
        return fn_ptr.group(1), "*"
    plain = re.fullmatch(
        r"(?:const\s+)?(?:struct\s+|enum\s+)?(\w+)\s*(\**)\s*(?:const\s+)?(\w+)", decl
    )
    if plain is None:
        raise HeaderError(f"cannot parse member declaration {decl!r}")
    type_name, stars, name = plain.groups()
    return name, "*" if stars else type_name


def parse(text: str) -> Header:
    """Parse the declarations of a C header's text."""
    out = Header()
    for name, value in re.findall(r"^\s*#\s*define\s+(\w+)\s+(\d+)\s*$", text, re.M):
        out.defines[name] = int(value)
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r"^\s*#(?:[^\n]*\\\n)*[^\n]*", " ", text, flags=re.M)  # directives
    for body, name in re.findall(r"enum\s*\w*\s*\{(.*?)\}\s*(\w*)\s*;", text, re.S):
        for key, value in re.findall(r"(\w+)\s*=\s*(\d+)\s*(?:,|$)", body.strip()):
            out.enums[key] = int(value)
        if name:
            out.scalars[name] = 4  # every enum here fits an int
    for base, alias in re.findall(r"typedef\s+(\w+)\s+(\w+)\s*;", text):
        if base in out.scalars:
            out.scalars[alias] = out.scalars[base]
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\}\s*\w*\s*;", text, re.S):
        decls = [" ".join(d.split()) for d in body.split(";")]
        out.structs[name] = [d for d in decls if d]
    for name, last in re.findall(r"XLA_FFI_DEFINE_STRUCT_TRAITS\(\s*(\w+)\s*,\s*(\w+)\s*\)", text):
        out.traits[name] = last
    return out
