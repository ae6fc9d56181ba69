"""The dynamic relocations of an ELF file: which GOT slots the loader fills, and with what.

What the engine needs to follow an IFUNC to the implementation its resolver selected
(engine/ifunc.py): the slots of R_X86_64_IRELATIVE relocations (the loader calls the resolver
at the addend and stores its answer in the slot), and the slots that JUMP_SLOT and GLOB_DAT
relocations bind to a named symbol. The file's bytes only: what the slots hold at run time
is read from the process by the engine (this layer never reads a process's memory).

Relocations come from the SHT_RELA sections (.rela.dyn, .rela.plt, and a static program's
.rela.iplt, which no dynamic entry names); a file without section headers is read through
its PT_DYNAMIC entries, as the loader reads it. Bounds: entries past the end of the file are
not read, a file that cannot be parsed has no relocations (IFUNCs in it are then probed at
their resolvers), and the result is kept once per ElfFile (itself cached per file identity).
"""
from __future__ import annotations

import os
import struct
import weakref
from dataclasses import dataclass, field

from .elf import ElfError, ElfFile

__all__ = ["Relocations", "relocations", "R_X86_64_GLOB_DAT", "R_X86_64_JUMP_SLOT", "R_X86_64_IRELATIVE"]

# The x86-64 psABI's relocation types read here (the symbols layer reads x86-64 ELF files only).
R_X86_64_GLOB_DAT = 6
R_X86_64_JUMP_SLOT = 7
R_X86_64_IRELATIVE = 37
_BOUND_TYPES = (R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT)

_EHDR = struct.Struct("<HHIQQQIHHHHHH")  # after the 16-byte e_ident
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")  # name type flags addr offset size link info align entsize
_RELA = struct.Struct("<QQq")         # r_offset, r_info (symbol << 32 | type), r_addend
_SYM = struct.Struct("<IBBHQQ")
_DYN = struct.Struct("<qQ")
_SHT_RELA = 4
_PT_DYNAMIC = 2
_DT_NULL, _DT_PLTRELSZ, _DT_STRTAB, _DT_SYMTAB, _DT_RELA, _DT_RELASZ, _DT_STRSZ = 0, 2, 5, 6, 7, 8, 10
_DT_PLTREL, _DT_JMPREL = 20, 23
_MAX_TABLE = 64 << 20  # no real relocation or symbol table is larger; a corrupt count is not read


@dataclass(frozen=True)
class Relocations:
    """Link-time addresses of GOT slots, by what the loader stores in them."""

    irelative: dict[int, tuple[int, ...]] = field(default_factory=dict)  # resolver address -> slots
    bound: dict[str, tuple[int, ...]] = field(default_factory=dict)      # symbol name -> slots


_cache: "weakref.WeakKeyDictionary[ElfFile, Relocations]" = weakref.WeakKeyDictionary()


def relocations(elf: ElfFile) -> Relocations:
    """ELF's IRELATIVE slots by resolver, and its JUMP_SLOT / GLOB_DAT slots by symbol name."""
    found = _cache.get(elf)
    if found is None:
        try:
            with open(elf.path, "rb") as f:
                found = _read(f.fileno(), elf)
        except (OSError, ValueError, IndexError, struct.error, ElfError):
            found = Relocations()
        _cache[elf] = found
    return found


def _pread(fd: int, size: int, offset: int) -> bytes:
    if size < 0 or offset < 0 or size > _MAX_TABLE:
        raise ValueError(f"bad table: {size} bytes at {offset:#x}")
    return os.pread(fd, size, offset)


def _read(fd: int, elf: ElfFile) -> Relocations:
    ident = _pread(fd, 64, 0)
    (_type, _machine, _version, _entry, phoff, shoff, _flags, _ehsize,
     phentsize, phnum, shentsize, shnum, _shstrndx) = _EHDR.unpack_from(ident, 16)
    # (relocation table, its symbol table, that table's strings): the symbol tables as bytes
    tables: list[tuple[bytes, bytes, bytes]] = []
    sections = []
    if shoff and shentsize >= _SHDR.size:
        if shnum == 0:  # extended numbering: the count is in section 0
            shnum = _SHDR.unpack(_pread(fd, _SHDR.size, shoff))[5]
        table = _pread(fd, shentsize * shnum, shoff)
        sections = [_SHDR.unpack_from(table, i * shentsize) for i in range(len(table) // shentsize)]
    if sections:
        for sh in sections:
            if sh[1] != _SHT_RELA or sh[9] not in (0, _RELA.size):
                continue
            symtab = strtab = b""
            if 0 < sh[6] < len(sections):
                sym_sh = sections[sh[6]]
                symtab = _pread(fd, sym_sh[5], sym_sh[4])
                if 0 < sym_sh[6] < len(sections):
                    str_sh = sections[sym_sh[6]]
                    strtab = _pread(fd, str_sh[5], str_sh[4])
            tables.append((_pread(fd, sh[5], sh[4]), symtab, strtab))
    elif phoff and phentsize >= _PHDR.size:
        tables = _dynamic_tables(fd, elf, phoff, phentsize, phnum)
    irelative: dict[int, list[int]] = {}
    bound: dict[str, list[int]] = {}
    for rela, symtab, strtab in tables:
        for r_offset, r_info, r_addend in _RELA.iter_unpack(rela[: len(rela) - len(rela) % _RELA.size]):
            r_type = r_info & 0xFFFFFFFF
            if r_type == R_X86_64_IRELATIVE:
                irelative.setdefault(r_addend, []).append(r_offset)
            elif r_type in _BOUND_TYPES:
                at = (r_info >> 32) * _SYM.size
                if at + _SYM.size > len(symtab):
                    continue
                st_name = _SYM.unpack_from(symtab, at)[0]
                name = strtab[st_name: strtab.find(b"\0", st_name)].decode("utf-8", "replace")
                if name:
                    bound.setdefault(name, []).append(r_offset)
    return Relocations({k: tuple(v) for k, v in irelative.items()}, {k: tuple(v) for k, v in bound.items()})


def _dynamic_tables(fd: int, elf: ElfFile, phoff: int, phentsize: int, phnum: int) -> list[tuple[bytes, bytes, bytes]]:
    """DT_RELA and DT_JMPREL, with DT_SYMTAB and DT_STRTAB: a file whose section headers are gone."""
    programs = _pread(fd, phentsize * phnum, phoff)
    dyn = {}
    for i in range(len(programs) // phentsize):
        p_type, _flags, offset, _vaddr, _paddr, filesz, _memsz, _align = _PHDR.unpack_from(programs, i * phentsize)
        if p_type == _PT_DYNAMIC:
            data = _pread(fd, filesz, offset)
            for tag, value in _DYN.iter_unpack(data[: len(data) - len(data) % _DYN.size]):
                if tag == _DT_NULL:
                    break
                dyn.setdefault(tag, value)
            break
    relas = [(dyn.get(_DT_RELA), dyn.get(_DT_RELASZ, 0))]
    if dyn.get(_DT_PLTREL, _DT_RELA) == _DT_RELA:
        relas.append((dyn.get(_DT_JMPREL), dyn.get(_DT_PLTRELSZ, 0)))
    strtab = b""
    if _DT_STRTAB in dyn:
        strtab = _pread(fd, dyn.get(_DT_STRSZ, 0), elf.vaddr_to_offset(dyn[_DT_STRTAB]))
    tables = []
    for at, size in relas:
        if at is None or not size:
            continue
        rela = _pread(fd, size, elf.vaddr_to_offset(at))
        # The symbol table's size is in no dynamic entry: read up to the highest index used.
        top = max((info >> 32 for _o, info, _a in _RELA.iter_unpack(rela[: len(rela) - len(rela) % _RELA.size])),
                  default=0)
        symtab = b""
        if _DT_SYMTAB in dyn and top:
            symtab = _pread(fd, (top + 1) * _SYM.size, elf.vaddr_to_offset(dyn[_DT_SYMTAB]))
        tables.append((rela, symtab, strtab))
    return tables
