"""A function's parameters read at a hit on its entry, typed by its DWARF (symbols/dwarf.py).

Values: int for integer, char and enum types, bool, float for floating types (from xmm
registers), str for `char *` (a bounded C string, a CutString when cut), int for other
pointers (the address) and Unavailable where the debug info has no location at the entry pc
or the memory cannot be read. Registers come through the tracee's register API, memory
through its reads: nothing here touches ptrace.
"""
from __future__ import annotations

import struct
from typing import Any

from ..symbols import FunctionInfo, Parameter, TypeInfo
from ..tracee import Tracee
from ..x86.arch import vector_register_index

__all__ = ["CutString", "MAX_STRING", "Unavailable", "read_arguments", "typed_value"]

MAX_STRING = 256  # bytes of a C string read at most
_PAGE = 4096


class Unavailable(str):
    """A parameter without a value at this hit; the text says why."""


class CutString(str):
    """A C string longer than the bound: the part read (its .cut is True)."""

    cut = True


def read_arguments(tracee: Tracee, tid: int, regs: Any, function: FunctionInfo) -> list[Any]:
    """FUNCTION's parameters as the thread TID with registers REGS has them at the entry pc."""
    return [_parameter(tracee, tid, regs, p) for p in function.parameters]


def _parameter(tracee: Tracee, tid: int, regs: Any, param: Parameter) -> Any:
    loc = param.location
    kind = param.type.kind
    try:
        if loc.kind == "constant":
            return typed_value(tracee, param.type, loc.value, None)
        if loc.kind == "register":
            n = vector_register_index(loc.register)
            if n is not None:
                return typed_value(tracee, param.type, 0, tracee.get_xmm(tid, n))
            return typed_value(tracee, param.type, getattr(regs, loc.register), None)
        if loc.kind == "memory":
            address = (getattr(regs, loc.register) + loc.offset) & (1 << 64) - 1
            size = param.type.size if kind not in ("string", "pointer") else 8
            if not 0 < size <= 16 or kind in ("struct", "union", "array", "unknown"):
                return address  # an aggregate passed in memory: its address
            data = tracee.memory.read(address, size)
            raw = int.from_bytes(data[:8], "little")
            return typed_value(tracee, param.type, raw, data if kind == "float" else None)
    except OSError as e:
        return Unavailable(f"unreadable: {e.strerror or e}")
    return Unavailable(loc.reason or "unavailable")


def typed_value(tracee: Tracee, type_: TypeInfo, raw: int, vector: bytes | None) -> Any:
    """RAW (a general register or word of memory) or VECTOR (an xmm register's bytes) as TYPE_."""
    kind, size = type_.kind, type_.size
    if kind == "float":
        data = vector if vector is not None else raw.to_bytes(8, "little")
        if size == 4:
            return struct.unpack("<f", data[:4])[0]
        if size == 8:
            return struct.unpack("<d", data[:8])[0]
        return Unavailable(f"{size}-byte floating point")
    if kind == "string":
        return read_string(tracee, raw) if raw else None
    if kind in ("pointer", "struct", "union", "array", "unknown") or not 0 < size <= 8:
        return raw
    value = raw & ((1 << (8 * size)) - 1)
    if kind == "bool":
        return bool(value)
    if kind in ("signed", "enum", "char") and value >= 1 << (8 * size - 1):
        value -= 1 << (8 * size)
    return value


def read_string(tracee: Tracee, address: int, limit: int = MAX_STRING) -> str | Unavailable:
    """The C string at ADDRESS, at most LIMIT bytes; reads stop at a page end first so a string
    near the end of its mapping is still read."""
    data = b""
    try:
        while len(data) < limit + 1:
            here = address + len(data)
            chunk = tracee.memory.read(here, min(limit + 1 - len(data), _PAGE - here % _PAGE))
            end = chunk.find(b"\0")
            if end >= 0:
                return (data + chunk[:end]).decode(errors="backslashreplace")
            data += chunk
    except OSError:
        if not data:
            return Unavailable(f"bad address {address:#x}")
        return CutString(data.decode(errors="backslashreplace"))
    return CutString(data[:limit].decode(errors="backslashreplace"))
