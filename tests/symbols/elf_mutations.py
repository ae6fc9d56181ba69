"""Seeded mutations of real ELF files, and what a caller may do with one.

Shared by tests/symbols/test_elf_fuzz.py (a few hundred mutations, in the suite) and
bench/fuzz_elf.py (as many as fit in N seconds). A mutation aims at the structures a reader
trusts: the ELF header, section and program headers (sizes, offsets, counts), the bytes of
the tables it parses (symbols, strings, versions, notes, .eh_frame), and where the file ends.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from pyprobes.symbols import ElfError, ElfFile
from pyprobes.symbols.ehframe import fde_ranges

_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
# (offset in the entry, struct format) of every field.
_SHDR_FIELDS = [(0, "I"), (4, "I"), (8, "Q"), (16, "Q"), (24, "Q"), (32, "Q"), (40, "I"), (44, "I"), (48, "Q"),
                (56, "Q")]
_PHDR_FIELDS = [(0, "I"), (4, "I"), (8, "Q"), (16, "Q"), (24, "Q"), (32, "Q"), (40, "Q"), (48, "Q")]
_TABLES = (b".symtab", b".dynsym", b".strtab", b".dynstr", b".eh_frame", b".eh_frame_hdr", b".gnu.version",
           b".gnu.version_d", b".note.gnu.build-id", b".gnu_debuglink", b".shstrtab")


def interesting(rng: random.Random, old: int, bits: int) -> int:
    """A value a corrupt field is likely to hold: a boundary, a huge count, or OLD nudged."""
    top = (1 << bits) - 1
    pick = rng.randrange(6)
    if pick == 0:
        return rng.choice([0, 1, 2, 0x40, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, 1 << 40,
                           1 << 47, 1 << 62, top]) & top
    if pick == 1:
        return (old + rng.randint(-16, 16)) & top
    if pick == 2:
        return old ^ (1 << rng.randrange(bits))
    if pick == 3:
        return (old * rng.choice([2, 16, 256, 1 << 20])) & top
    return rng.getrandbits(bits) if pick == 4 else top - rng.randrange(256)


@dataclass
class Layout:
    """Where a pristine file keeps its headers and sections."""

    shoff: int
    shentsize: int
    shnum: int
    phoff: int
    phentsize: int
    phnum: int
    sections: dict[bytes, tuple[int, int, int]]  # name -> (header index, offset, size)

    @classmethod
    def of(cls, data: bytes) -> Layout:
        (phoff, shoff) = struct.unpack_from("<QQ", data, 0x20)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", data, 0x36)
        headers = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
        names = b""
        if 0 < shstrndx < shnum:
            names = data[headers[shstrndx][4]:headers[shstrndx][4] + headers[shstrndx][5]]
        sections = {}
        for i, sh in enumerate(headers):
            name = names[sh[0]:names.find(b"\0", sh[0])]
            sections.setdefault(name, (i, sh[4], sh[5] if sh[1] != 8 else 0))
        return cls(shoff, shentsize, shnum, phoff, phentsize, phnum, sections)


def _set(data: bytearray, offset: int, fmt: str, value: int) -> None:
    if 0 <= offset and offset + struct.calcsize("<" + fmt) <= len(data):
        struct.pack_into("<" + fmt, data, offset, value)


def _field(data: bytearray, rng: random.Random, offset: int, fields: list[tuple[int, str]]) -> str:
    at, fmt = rng.choice(fields)
    bits = 8 * struct.calcsize(fmt)
    if offset + at + bits // 8 > len(data):
        return "nothing (header past the end)"
    (old,) = struct.unpack_from("<" + fmt, data, offset + at)
    new = interesting(rng, old, bits)
    _set(data, offset + at, fmt, new)
    return f"field +{at} 0x{old:x} -> 0x{new:x}"


_IN_PLACE = ["ident", "header", "shdr", "shdr", "phdr", "phdr", "table", "table", "eh_frame", "extended"]


def mutate(original: bytes, layout: Layout, rng: random.Random, kind: str | None = None) -> tuple[bytes, str]:
    """One corrupt copy of ORIGINAL (a file LAYOUT describes), and what was done to it."""
    data = bytearray(original)
    kind = kind or rng.choice(["truncate", "mixed"] + _IN_PLACE)
    if kind == "mixed":  # several at once, maybe cut short too
        done = []
        for _ in range(rng.randint(2, 4)):
            data_bytes, what = mutate(bytes(data), layout, rng, rng.choice(_IN_PLACE))
            data = bytearray(data_bytes)
            done.append(what)
        if rng.random() < 0.3:
            data_bytes, what = mutate(bytes(data), layout, rng, "truncate")
            data = bytearray(data_bytes)
            done.append(what)
        return bytes(data), " + ".join(done)
    if kind == "truncate":
        marks = [64, layout.phoff, layout.shoff] + [o + rng.choice([0, s // 2, s]) for _i, o, s in
                                                    layout.sections.values()]
        cut = rng.choice([rng.randrange(len(data)), rng.choice(marks) + rng.randint(-8, 8)])
        cut = max(0, min(cut, len(data) - 1))
        return bytes(data[:cut]), f"truncated at 0x{cut:x}"
    if kind == "ident":
        at = rng.randrange(16)
        data[at] ^= 1 << rng.randrange(8)
        return bytes(data), f"ident byte {at} flipped"
    if kind == "header":
        flips = []
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(16, 64)
            data[at] ^= 1 << rng.randrange(8)
            flips.append(at)
        return bytes(data), f"header bytes {flips} flipped"
    if kind == "shdr" and layout.shnum:
        i = rng.randrange(layout.shnum)
        return bytes(data), f"section header {i}: " + _field(data, rng, layout.shoff + i * layout.shentsize,
                                                              _SHDR_FIELDS)
    if kind == "phdr" and layout.phnum:
        i = rng.randrange(layout.phnum)
        return bytes(data), f"program header {i}: " + _field(data, rng, layout.phoff + i * layout.phentsize,
                                                              _PHDR_FIELDS)
    if kind == "extended" and layout.shnum:
        which = rng.randrange(3)
        at, fmt, sh_at = [(0x3C, "H", 32), (0x3E, "H", 40), (0x38, "H", 44)][which]
        _set(data, at, fmt, 0 if which == 0 else 0xFFFF)
        entry = layout.shoff + sh_at
        _set(data, entry, "Q" if which == 0 else "I", interesting(rng, 0, 64 if which == 0 else 32))
        return bytes(data), f"extended numbering {['shnum', 'shstrndx', 'phnum'][which]}"
    present = [n for n in _TABLES if n in layout.sections and layout.sections[n][2]]
    if kind == "eh_frame" and b".eh_frame" in layout.sections:
        _i, off, size = layout.sections[b".eh_frame"]
        # Walk the pristine records and corrupt one of their length or CIE-pointer words.
        starts, pos = [], off
        while pos + 8 <= min(off + size, len(original)) and len(starts) < 4096:
            (length,) = struct.unpack_from("<I", original, pos)
            if length in (0, 0xFFFFFFFF):
                break
            starts.append(pos)
            pos += 4 + length
        if starts:
            at = rng.choice(starts) + rng.choice([0, 4, 8, 9, 12])
            old = data[at] if at < len(data) else 0
            _set(data, at, "I", interesting(rng, old, 32))
            return bytes(data), f".eh_frame word at 0x{at:x} corrupted"
    if present:
        name = rng.choice(present)
        _i, off, size = layout.sections[name]
        spots = []
        for _ in range(rng.randint(1, 16)):
            at = off + rng.randrange(size)
            if at < len(data):
                data[at] = rng.randrange(256)
                spots.append(at)
        return bytes(data), f"{name.decode()} bytes at {[hex(s) for s in spots]} overwritten"
    at = rng.randrange(len(data))
    data[at] ^= 0xFF
    return bytes(data), f"byte 0x{at:x} inverted"


def exercise(path: str, eh_frame: tuple[int, int, int] | None = None) -> str:
    """Everything a caller asks of ElfFile about PATH; returns how far it got. Only ElfError may
    come out (a clean result otherwise): anything else is the bug the fuzzing looks for.
    EH_FRAME: (offset, size, vaddr) of the pristine file's .eh_frame, parsed raw as well."""
    if eh_frame is not None:
        offset, size, vaddr = eh_frame
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(size)
        try:
            for _ in fde_ranges(raw, vaddr):
                pass
        except ElfError:
            pass
    try:
        elf = ElfFile.load(path)
    except ElfError:
        return "refused at load"
    for call in (lambda: ElfFile.load_with_debug(path).functions, lambda: elf.frame_functions,
                 lambda: elf.names(), lambda: elf.lookup("main"), lambda: elf.object_address("_r_debug")):
        try:
            call()
        except ElfError:
            pass
    try:
        functions = elf.functions
    except ElfError:
        return "refused at functions"
    for sym in functions[:: max(1, len(functions) // 16)]:
        elf.function_containing(sym.address + sym.size // 2)
        elf.function_containing(sym.address + sym.size)
        elf.aliases(sym.address)
        try:
            elf.read_vaddr(sym.address, min(sym.size, 16) or 16)
        except (ElfError, ValueError):
            pass  # ValueError: not inside one loadable segment, as documented
    return "loaded"
