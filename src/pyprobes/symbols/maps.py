"""A process's memory map: which ELF files are loaded where.

/proc/PID/maps is the only source (parsed by tracee/maps.py; no ptrace needed). The
load bias (runtime address minus link-time address) of each file is derived from its
mappings and program headers.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field

from ..tracee.maps import DELETED_SUFFIX as _DELETED
from ..tracee.maps import Mapping, parse_maps, read_maps
from .elf import ElfError, ElfFile

__all__ = ["Mapping", "Module", "parse_maps", "read_maps", "modules", "main_module"]

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Module:
    """An ELF file mapped into a process.

    ``load_bias`` turns a link-time address (symbol st_value) into a runtime
    address: 0 for a non-PIE executable.
    """

    path: str  # as in /proc/PID/maps, without " (deleted)"
    base: int  # lowest mapped address
    load_bias: int
    mappings: tuple[Mapping, ...] = field(compare=False, repr=False)
    elf: ElfFile = field(compare=False, repr=False)
    deleted: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        """The file name, as users write it before a colon ("libc.so.6")."""
        return os.path.basename(self.path)

    @property
    def end(self) -> int:
        return max(m.end for m in self.mappings)

    def mapping_at(self, address: int) -> Mapping | None:
        for m in self.mappings:
            if m.start <= address < m.end:
                return m
        return None

    def to_runtime(self, vaddr: int) -> int:
        return vaddr + self.load_bias

    def to_link(self, address: int) -> int:
        return address - self.load_bias


def _candidates(pid: int, path: str, first: Mapping):
    # The path in maps is the tracee's view: in another mount namespace it
    # names a different file (or none) here. /proc/PID/root/PATH is the
    # tracee's file; /proc/PID/map_files/ opens a deleted one (root only).
    if not first.deleted:
        yield path
        yield f"/proc/{pid}/root{path}"
    yield f"/proc/{pid}/map_files/{first.start:x}-{first.end:x}"


def _open_elf(pid: int, path: str, first: Mapping, exe_ino: int | None) -> ElfFile | None:
    candidates = list(_candidates(pid, path, first))
    if first.deleted and exe_ino == first.inode:
        # The executable stays reachable through /proc/PID/exe even when
        # it was deleted (rebuilt while running, the common case).
        candidates.insert(0, f"/proc/{pid}/exe")
    for candidate in candidates:
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if st.st_ino != first.inode:
            continue  # not the mapped file (replaced on disk, or another namespace)
        try:
            return ElfFile.load_with_debug(candidate)
        except (ElfError, OSError):
            return None
    if first.deleted:
        log.info("skipping %s: deleted and not reachable through /proc/%d", path, pid)
    return None


def load_bias(elf: ElfFile, mappings: list[Mapping] | tuple[Mapping, ...]) -> int | None:
    """Runtime address minus link-time address for ELF mapped as MAPPINGS.

    A mapping starting at file offset O maps link-time address
    ``seg.vaddr - (seg.offset - O)`` for the PT_LOAD holding O. Several
    segments can share a file page (small binaries), so each candidate bias
    is scored by how many mappings it explains.
    """
    best: tuple[int, int] | None = None
    tried: set[int] = set()
    for m in mappings:
        for seg in elf.segments:
            first_page = seg.offset & ~(_PAGE - 1)
            if not first_page <= m.offset < seg.offset + max(seg.filesz, 1):
                continue
            bias = m.start - (seg.vaddr - (seg.offset - m.offset))
            if bias % _PAGE or bias in tried:
                continue
            tried.add(bias)
            score = sum(1 for mm in mappings if _explains(elf, bias, mm))
            if best is None or score > best[0]:
                best = (score, bias)
    return None if best is None else best[1]


def _explains(elf: ElfFile, bias: int, m: Mapping) -> bool:
    for seg in elf.segments:
        if m.start - m.offset == bias + seg.vaddr - seg.offset:
            lo = (seg.vaddr + bias) & ~(_PAGE - 1)
            if lo <= m.start < seg.vaddr + bias + seg.memsz:
                return True
    return False


def modules(pid: int, maps: list[Mapping] | None = None) -> list[Module]:
    """ELF files mapped into PID, in order of first appearance in its maps.

    Pseudo-mappings ([vdso], [stack], ...) and non-ELF files (locale
    archives, fonts) are left out, as are deleted files that cannot be
    reopened.
    """
    if maps is None:
        maps = read_maps(pid)
    groups: dict[tuple, list[Mapping]] = {}
    for m in maps:
        if m.inode == 0 or not m.path.startswith("/"):
            continue
        groups.setdefault((m.dev, m.inode, m.path), []).append(m)
    try:
        exe_ino = os.stat(f"/proc/{pid}/exe").st_ino
    except OSError:
        exe_ino = None
    out = []
    for (_dev, _ino, raw_path), group in groups.items():
        deleted = group[0].deleted
        path = raw_path[: -len(_DELETED)] if deleted else raw_path
        elf = _open_elf(pid, path, group[0], exe_ino)
        if elf is None:
            continue
        bias = load_bias(elf, group)
        if bias is None:
            continue  # an ELF file mapped as data, not loaded
        out.append(Module(path, min(m.start for m in group), bias, tuple(group), elf, deleted))
    return out


def main_module(pid: int, mods: list[Module] | None = None) -> Module:
    """The module of the executable (/proc/PID/exe)."""
    if mods is None:
        mods = modules(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        exe_ino = os.stat(f"/proc/{pid}/exe").st_ino
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    if exe.endswith(_DELETED):
        exe = exe[: -len(_DELETED)]
    for mod in mods:
        if mod.path == exe:
            return mod
    for mod in mods:  # another mount namespace: the paths differ, the file is the same
        if mod.mappings[0].inode == exe_ino:
            return mod
    raise LookupError(f"process {pid}: its executable {exe} is not among its mapped modules")


AT_BASE = 7    # auxv: where the kernel mapped the program's interpreter (0: none, a static program)
AT_ENTRY = 9   # auxv: the program's entry point, where the loader jumps once libraries are in


def auxv_value(pid: int, key: int) -> int | None:
    """The value of KEY in PID's auxiliary vector, or None if unreadable or absent."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            data = f.read()
    except OSError:
        return None
    for k, value in struct.iter_unpack("<QQ", data[: len(data) // 16 * 16]):
        if k == key:
            return value
    return None
