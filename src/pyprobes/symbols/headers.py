"""ELF64 little-endian headers: the file header, the program and section header tables, PT_LOADs.

The headers are few and fixed-layout, so they are unpacked here directly:
pyelftools builds an object per section (and parses the hash tables while at
it), 25 ms of libc's load for nothing pyprobes uses. Every size and count comes
from the file and may be corrupt: each read is checked against the file's size
first, so a corrupt file ends in ElfError, never in a huge allocation.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import NamedTuple

from ..errors import PyprobesError

__all__ = [
    "PF_X",
    "ElfError",
    "Headers",
    "Reader",
    "Segment",
    "bounded_reader",
    "load_segments",
    "read_headers",
    "section_data",
]

_EHDR = struct.Struct("<HHIQQQIHHHHHH")  # after the 16-byte e_ident
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")  # name type flags addr offset size link info align entsize
_PT_LOAD = 1
_SHT_NOBITS = 8
PF_X = 1
# x86-64 user space ends at 2**47 (2**56 with 5-level paging): a segment beyond it cannot be loaded.
_ADDRESS_SPACE_END = 1 << 57

# read(what, size, offset): SIZE bytes of the file at OFFSET, or an ElfError naming WHAT.
Reader = Callable[[str, int, int], bytes]


class ElfError(PyprobesError, ValueError):
    """The file is not an ELF file pyprobes can use (or is corrupt)."""


class Segment(NamedTuple):
    """A PT_LOAD program header."""

    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int  # PF_X=1, PF_W=2, PF_R=4


class Headers(NamedTuple):
    """What the file header and its tables say, unpacked but not yet interpreted."""

    e_type: int
    programs: list[tuple]  # Elf64_Phdr: type flags offset vaddr paddr filesz memsz align
    sections: list[tuple]  # Elf64_Shdr: name type flags addr offset size link info align entsize
    shstrndx: int  # index of the section name table (extended numbering already followed)


def bounded_reader(fd: int, file_size: int, path: str) -> Reader:
    """A Reader of file FD (of FILE_SIZE bytes, named PATH in errors) that reads nothing past its end."""

    def read(what: str, size: int, offset: int) -> bytes:
        if offset > file_size or size > file_size - offset:
            raise ElfError(f"{path}: {what} (0x{size:x} bytes at offset 0x{offset:x}) "
                           f"lies past the end of the file (0x{file_size:x} bytes)")
        return _pread_exact(fd, size, offset)

    return read


def read_headers(fd: int, read: Reader, path: str) -> Headers:
    """The file header of FD and both header tables; ElfError if it is not an ELF64 little-endian file."""
    ident = os.pread(fd, 64, 0)
    if len(ident) < 64 or ident[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    if ident[4] != 2 or ident[5] != 1:
        raise ElfError(f"{path}: only 64-bit little-endian ELF files are supported")
    (e_type, _machine, _version, _entry, phoff, shoff, _flags, _ehsize,
     phentsize, phnum, shentsize, shnum, shstrndx) = _EHDR.unpack_from(ident, 16)

    sections: list[tuple] = []
    if shoff:
        if shentsize < _SHDR.size:
            raise ElfError(f"{path}: corrupt ELF header: section header size {shentsize} < {_SHDR.size}")
        first = _SHDR.unpack_from(read("the section header table", _SHDR.size, shoff))
        # Extended numbering: counts too large for the header live in section 0.
        if shnum == 0:
            shnum = first[5]
        if shstrndx == 0xFFFF:
            shstrndx = first[6]
        if phnum == 0xFFFF:
            phnum = first[7]
        table = read(f"the section header table ({shnum} entries)", shentsize * shnum, shoff)
        sections = [_SHDR.unpack_from(table, i * shentsize) for i in range(shnum)]
    programs = []
    if phoff and phnum:
        if phentsize < _PHDR.size:
            raise ElfError(f"{path}: corrupt ELF header: program header size {phentsize} < {_PHDR.size}")
        table = read(f"the program header table ({phnum} entries)", phentsize * phnum, phoff)
        programs = [_PHDR.unpack_from(table, i * phentsize) for i in range(phnum)]
    return Headers(e_type, programs, sections, shstrndx)


def load_segments(programs: list[tuple], file_size: int, path: str) -> tuple[Segment, ...]:
    """The PT_LOAD entries of PROGRAMS; ElfError for one the loader could not map as given."""
    segments = tuple(
        Segment(vaddr, memsz, offset, filesz, flags)
        for (p_type, flags, offset, vaddr, _paddr, filesz, memsz, _align) in programs
        if p_type == _PT_LOAD
    )
    end = 0
    for seg in segments:
        where = f"{path}: corrupt PT_LOAD segment at 0x{seg.vaddr:x}"
        if seg.offset > file_size or seg.filesz > file_size - seg.offset:
            raise ElfError(f"{where}: its 0x{seg.filesz:x} bytes at offset 0x{seg.offset:x} "
                           f"lie past the end of the file (0x{file_size:x} bytes)")
        if seg.filesz > seg.memsz:
            raise ElfError(f"{where}: 0x{seg.filesz:x} bytes in the file, more than its 0x{seg.memsz:x} in memory")
        if seg.vaddr + seg.memsz > _ADDRESS_SPACE_END:
            raise ElfError(f"{where}: 0x{seg.memsz:x} bytes do not fit in an address space")
        # The ELF spec orders PT_LOADs by address; overlapping ones cannot all be mapped.
        if seg.vaddr < end:
            raise ElfError(f"{where}: it overlaps or precedes the segment before it")
        end = seg.vaddr + seg.memsz
    return segments


def section_data(read: Reader, sh: tuple, what: str) -> bytes:
    """The bytes of section SH (none for SHT_NOBITS: .bss, or any section a debug file keeps only the header of)."""
    return b"" if sh[1] == _SHT_NOBITS else read(what, sh[5], sh[4])


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ElfError(f"truncated ELF file: wanted {size} bytes at 0x{offset:x}")
    return data
