"""ELF notes (SHT_NOTE sections, PT_NOTE segments) and the ids a file carries for its debug file.

The GNU build-id is a note; the .gnu_debuglink section (a file name and its CRC) is
not a note but serves the same purpose, so it is read here too.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["StapsdtNote", "gnu_build_id", "iter_notes", "parse_debuglink", "stapsdt_notes"]

_NT_GNU_BUILD_ID = 3


def iter_notes(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """(owner name, note type, descriptor) of each note in DATA; stops at the last whole header."""
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off : off + namesz]
        off += (namesz + 3) & ~3
        desc = data[off : off + descsz]
        off += (descsz + 3) & ~3
        yield name.rstrip(b"\0"), ntype, desc


def gnu_build_id(data: bytes) -> str | None:
    """The build-id in the notes DATA, as hex; None if they hold none."""
    # Note types are per owner: type 3 is also NT_STAPSDT (USDT probes,
    # owner "stapsdt"), so the owner name must be checked too.
    for name, ntype, desc in iter_notes(data):
        if name == b"GNU" and ntype == _NT_GNU_BUILD_ID and desc:
            return desc.hex()
    return None


def parse_debuglink(data: bytes) -> tuple[str, int] | None:
    """(file name, CRC32) from a .gnu_debuglink section's DATA; None if it is malformed."""
    end = data.find(b"\0")
    if end <= 0:
        return None
    crc_at = (end + 4) & ~3  # name, NUL, padding to 4, then the CRC
    if crc_at + 4 > len(data):
        return None
    (crc,) = struct.unpack_from("<I", data, crc_at)
    return data[:end].decode("utf-8", "replace"), crc


_NT_STAPSDT = 3


@dataclass(frozen=True)
class StapsdtNote:
    """One SystemTap SDT note (owner "stapsdt", type 3), addresses as linked."""

    pc: int  # the probe site, a nop
    base: int  # the .stapsdt.base address at link time, for prelink adjustment
    semaphore: int  # 0 when the probe has none
    provider: str
    name: str
    args: str  # the argument specs, e.g. "-4@%edi 8@-16(%rbp)"


def stapsdt_notes(data: bytes) -> list[StapsdtNote]:
    """The SDT notes in the notes DATA (ELF64); malformed ones are skipped."""
    out = []
    for owner, ntype, desc in iter_notes(data):
        if owner != b"stapsdt" or ntype != _NT_STAPSDT or len(desc) < 24:
            continue
        pc, base, semaphore = struct.unpack_from("<QQQ", desc)
        strings = desc[24:].split(b"\0")
        if len(strings) < 3:
            continue
        provider, name, args = (s.decode("utf-8", "replace") for s in strings[:3])
        out.append(StapsdtNote(pc, base, semaphore, provider, name, args))
    return out
