"""A hit's arguments as typed values: a USDT probe's from its note, a function's from the
System V registers, each shown as the spec's type list says (`Probe.args`, `Process.args`).
DWARF-typed parameters are engine/args.py's."""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from ..symbols import parse_spec
from ..x86.registers import FLOAT_ARGUMENTS, INTEGER_ARGUMENTS

__all__ = ["STRING_LIMIT", "parse_types", "read_string", "typed_args"]

STRING_LIMIT = 256  # bytes of a `str` argument read before it is cut (and marked with "...")
_PAGE = 4096


class Memory(Protocol):
    def read(self, address: int, size: int) -> bytes: ...


def parse_types(spec: object) -> tuple[str, ...] | None:
    """The type list of SPEC's text, or None."""
    return parse_spec(spec).types if isinstance(spec, str) else None


def read_string(memory: Memory, address: int, limit: int = STRING_LIMIT) -> str | None:
    """The C string at ADDRESS, at most LIMIT bytes, "..." appended when cut; None for NULL."""
    if address == 0:
        return None
    data = b""
    at = address
    while len(data) < limit:
        chunk = min(limit - len(data), _PAGE - at % _PAGE)
        try:
            part = memory.read(at, chunk)
        except OSError:
            if not data:
                return f"<unreadable 0x{address:x}>"
            break
        end = part.find(b"\0")
        if end >= 0:
            return (data + part[:end]).decode("utf-8", "backslashreplace")
        data += part
        at += chunk
    return data.decode("utf-8", "backslashreplace") + "..."


def _typed(kind: str, raw: int, memory: Memory) -> Any:
    unsigned = raw & 0xFFFFFFFFFFFFFFFF
    if kind == "int":
        return raw if raw < 0 else (unsigned - (1 << 64) if unsigned >> 63 else unsigned)
    if kind == "uint":
        return unsigned
    if kind in ("hex", "ptr"):
        return f"0x{unsigned:x}"
    if kind == "str":
        return read_string(memory, unsigned)
    if kind == "double":
        return struct.unpack("<d", struct.pack("<Q", unsigned))[0]
    raise ValueError(f"unknown type {kind!r}")


def typed_args(target: Any, types: tuple[str, ...] | None, tid: int, regs: Any, memory: Memory,
               get_xmm: Callable[[int, int], bytes]) -> list[Any]:
    """A hit's arguments: a USDT probe's from its note (all of them, `int` unless TYPES says),
    a function's from the System V registers (as many as TYPES names; xmm0... for `double`)."""
    usdt = getattr(target, "usdt", None)
    if usdt is not None:
        raws = usdt.arguments(regs, memory.read, target.module.load_bias)
        kinds = list(types or ()) + ["int"] * max(0, len(raws) - len(types or ()))
        return [_typed(kind, raw, memory) for kind, raw in zip(kinds, raws)]
    if not types:
        return []
    out: list[Any] = []
    ints = floats = 0
    for kind in types:
        if kind == "double":
            if floats >= FLOAT_ARGUMENTS:
                raise ValueError("more double arguments than xmm registers")
            out.append(struct.unpack_from("<d", get_xmm(tid, floats))[0])
            floats += 1
            continue
        if ints >= len(INTEGER_ARGUMENTS):
            raise ValueError(f"more than {len(INTEGER_ARGUMENTS)} integer arguments: the rest are on the stack")
        out.append(_typed(kind, getattr(regs, INTEGER_ARGUMENTS[ints]), memory))
        ints += 1
    return out
