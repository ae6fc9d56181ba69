"""One ELF file on disk: its loadable segments, its function symbols, its ids.

Everything pyprobes needs to turn a name into a link-time address (and back)
and to read the file's own bytes at a link-time address, with the caches that
make a second load free. The raw headers are read by headers.py, the symbol
tables by symtab.py, the notes by notes.py; debuginfo.py finds the separate
debug file ``ElfFile.load_with_debug`` adds.
"""
from __future__ import annotations

import bisect
import operator
import os
import stat
import struct
from collections import Counter, OrderedDict

from .debuginfo import DEFAULT_DEBUG_ROOT, find_debug_file
from .ehframe import eh_frame_from_hdr, fde_ranges
from .headers import PF_X, ElfError, Reader, Segment, bounded_reader, load_segments, read_headers, section_data
from .notes import gnu_build_id, parse_debuglink
from .symtab import SYM64, Symbol, hidden_versions, lookup_order, object_value, preference, read_functions

__all__ = [
    "CodeReader",
    "ElfError",
    "ElfFile",
    "Segment",
    "Symbol",
    "find_debug_file",
]

_ET_DYN = 3
_PT_NOTE = 4
_PT_GNU_EH_FRAME = 0x6474E550
_SHT_SYMTAB = 2
_SHT_NOTE = 7
_SHT_NOBITS = 8
_SHT_DYNSYM = 11
_SHT_GNU_VERDEF = 0x6FFFFFFD
_SHT_GNU_VERSYM = 0x6FFFFFFF

# Keyed by (path, device, inode, size, mtime): a rebuilt binary at the same
# path must not be served stale symbols. Bounded so a long-lived tracer that
# sees many short-lived programs does not grow without limit.
_CACHE_LIMIT = 256
_cache: OrderedDict[tuple, ElfFile | ElfError] = OrderedDict()
_debug_cache: OrderedDict[tuple, ElfFile] = OrderedDict()


def _stat_key(path: str) -> tuple:
    """(path, device, inode, size, mtime, mode): the cache key, and the mode to check it by."""
    st = os.stat(path)
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


def _cache_put(cache: OrderedDict, key: tuple, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_LIMIT:
        cache.popitem(last=False)


_by_address = operator.itemgetter(1)


class ElfFile:
    """An ELF64 little-endian file (x86-64 executables and shared objects).

    Build with ``ElfFile.load(path)`` or ``ElfFile.load_with_debug(path)``;
    both cache per file identity, so repeated calls are free.
    """

    path: str
    is_pie_or_shared: bool
    build_id: str | None
    debuglink: tuple[str, int] | None
    segments: tuple[Segment, ...]
    has_symtab: bool
    debug_file: str | None

    def __init__(self, path: str, key: tuple) -> None:
        self.path = path
        self._key = key
        self.debug_file = None
        self._functions: list[Symbol] | None = None
        self._debug_base: tuple[ElfFile, ElfFile] | None = None  # (binary, debug file)
        self._frames: list[Symbol] | None = None
        self._frame_error: str | None = None
        try:
            with open(path, "rb") as f:
                self._parse(f)
        except (struct.error, IndexError) as exc:
            raise ElfError(f"{path}: unreadable ELF file ({exc})") from exc

    @property
    def functions(self) -> list[Symbol]:
        """Defined functions (STT_FUNC, STT_GNU_IFUNC), sorted by address.

        Read on first use: a process maps dozens of libraries and a lookup
        usually stops at the first one defining the name.
        """
        if self._functions is None:
            if self._debug_base is not None:
                # Raw lists unless already sorted: the two files' own tables
                # may never be needed by themselves.
                base, debug = self._debug_base
                own = base._functions if base._functions is not None else base._read_symbols()
                funcs = own + debug._read_symbols()
            else:
                funcs = self._read_symbols()
            if not funcs:
                funcs = list(self.frame_functions)  # stripped: .eh_frame still bounds every function
            self._set_functions(funcs)
        return self._functions

    @property
    def frame_functions(self) -> list[Symbol]:
        """Every function .eh_frame describes, named "0xSTART" (binding "local"), sorted by address.

        What a stripped file still says about its functions: ``functions`` when the file has no
        function symbols at all, and the bounds ``function_containing`` falls back on for code no
        symbol covers. Never raises for a corrupt .eh_frame: the FDEs before the corrupt record
        are kept and ``frame_error`` says what was wrong.
        """
        if self._frames is None:
            self._frames = self._read_frames()
            self._frame_starts = [s[1] for s in self._frames]
        return self._frames

    @property
    def frame_error(self) -> str | None:
        """What is wrong with .eh_frame, if ``frame_functions`` stopped at a corrupt record."""
        self.frame_functions  # noqa: B018 - reads .eh_frame on first use
        return self._frame_error

    def eh_frame_bytes(self) -> tuple[bytes | None, int, int]:
        """(.eh_frame's bytes, its link-time address, the DW_EH_PE_datarel base); None bytes without one."""
        if self._eh_frame is None or not self.segments:
            return None, 0, 0  # a relocatable file's FDEs hold unrelocated addresses
        vaddr, offset, size = self._eh_frame
        with open(self.path, "rb") as f:
            self._check_identity(f)
            return self._reader(f.fileno())(".eh_frame", size, offset), vaddr, self._got

    def _read_frames(self) -> list[Symbol]:
        data, vaddr, got = self.eh_frame_bytes()
        if data is None:
            return []
        ranges = []
        try:
            ranges.extend(fde_ranges(data, vaddr, got))
        except ElfError as e:
            self._frame_error = f"{self.path}: {e}"
        code = [(seg.vaddr, seg.vaddr + seg.memsz) for seg in self.segments if seg.flags & PF_X]
        ranges = sorted(r for r in ranges if any(lo <= r[0] and r[0] + r[1] <= hi for lo, hi in code)
                        and not any(lo <= r[0] < hi for lo, hi in self._plt))
        frames = []
        end = 0
        for start, length in ranges:
            if start >= end:  # overlapping FDEs: a corrupt table; the first one wins
                frames.append(Symbol(f"0x{start:x}", start, length, "local"))
                end = start + length
        return frames

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | os.PathLike) -> ElfFile:
        """The ElfFile for PATH, parsed once per file identity."""
        path = os.fspath(path)
        key = _stat_key(path)
        if not stat.S_ISREG(key[-1]):
            # Opening a FIFO would block, and a device has no size to bound reads by.
            raise ElfError(f"{path}: not a regular file")
        key = key[:-1]
        hit = _cache.get(key)
        if hit is None:
            try:
                hit = cls(path, key)
            except ElfError as exc:
                hit = exc  # remember non-ELF files too: maps list many (locale-archive, fonts)
            _cache_put(_cache, key, hit)
        else:
            _cache.move_to_end(key)
        if isinstance(hit, ElfError):
            raise hit
        return hit

    @classmethod
    def load_with_debug(cls, path: str | os.PathLike, debug_root: str = DEFAULT_DEBUG_ROOT) -> ElfFile:
        """Like ``load``, plus the functions of a separate debug file when PATH has no .symtab.

        Distributions strip .symtab (static functions and most internal ones)
        into a debug file found by build-id or .gnu_debuglink.
        """
        base = cls.load(path)
        if base.has_symtab:
            return base
        key = base._key + (debug_root,)
        hit = _debug_cache.get(key)
        if hit is not None:
            _debug_cache.move_to_end(key)
            return hit
        merged = base
        debug_path = find_debug_file(base, debug_root)
        if debug_path is not None:
            try:
                debug = cls.load(debug_path)
            except (ElfError, OSError):
                debug = None
            if debug is not None and debug._symtabs:
                merged = base._with_debug(debug, str(debug_path))
        _cache_put(_debug_cache, key, merged)
        return merged

    def _with_debug(self, debug: ElfFile, debug_path: str) -> ElfFile:
        clone = object.__new__(ElfFile)
        clone.__dict__.update(self.__dict__)
        clone.debug_file = debug_path
        clone._functions = None
        clone._debug_base = (self, debug)
        return clone

    def _parse(self, f) -> None:
        fd = f.fileno()
        read = self._reader(fd)
        e_type, programs, sections, shstrndx = read_headers(fd, read, self.path)
        self.is_pie_or_shared = e_type == _ET_DYN
        self.segments = load_segments(programs, self._key[3], self.path)

        shstrtab = b""
        if 0 < shstrndx < len(sections):
            shstrtab = section_data(read, sections[shstrndx], "the section name table")

        def name_of(sh: tuple) -> bytes:
            return shstrtab[sh[0] : shstrtab.find(b"\0", sh[0])] if sh[0] < len(shstrtab) else b""

        self.build_id = None
        self.debuglink = None
        self.has_symtab = False
        self._eh_frame: tuple[int, int, int] | None = None  # (vaddr, offset, size)
        self._got = 0
        self._plt: list[tuple[int, int]] = []  # .plt, .plt.got, .plt.sec: stubs, not functions
        symtabs = []
        versym = verdef = None
        notes_seen = False
        for sh in sections:
            sh_type = sh[1]
            if sh_type in (_SHT_SYMTAB, _SHT_DYNSYM):
                symtabs.append(sh)
                self.has_symtab |= sh_type == _SHT_SYMTAB
            elif sh_type == _SHT_GNU_VERSYM:
                versym = sh
            elif sh_type == _SHT_GNU_VERDEF:
                verdef = sh
            elif sh_type == _SHT_NOTE:
                notes_seen = True
                if self.build_id is None:
                    self.build_id = gnu_build_id(section_data(read, sh, "a note section"))
            else:
                name = name_of(sh)
                if name == b".gnu_debuglink":
                    self.debuglink = parse_debuglink(section_data(read, sh, name.decode()))
                elif name == b".eh_frame" and sh_type != _SHT_NOBITS and self._eh_frame is None:
                    self._eh_frame = (sh[3], sh[4], sh[5])
                elif name == b".got":
                    self._got = sh[3]
                elif name.startswith(b".plt"):
                    self._plt.append((sh[3], sh[3] + sh[5]))
        if not notes_seen:
            # Section headers can be stripped (sstrip); the notes are still in PT_NOTE.
            for (p_type, _f, offset, _v, _p, filesz, _m, _a) in programs:
                if p_type == _PT_NOTE and self.build_id is None:
                    self.build_id = gnu_build_id(read("a PT_NOTE segment", filesz, offset))
        if self._eh_frame is None:
            self._eh_frame = self._eh_frame_from_segments(read, programs)

        # Only where the symbols are is noted now; see ``functions``.
        self._symtabs = []
        for sh in symtabs:
            if not 0 < sh[6] < len(sections) or sh[9] not in (0, SYM64.size):
                continue
            versions = None
            if sh[1] == _SHT_DYNSYM and versym is not None and verdef is not None and 0 < verdef[6] < len(sections):
                versions = (versym, verdef, sections[verdef[6]])
            self._symtabs.append((sh, sections[sh[6]], versions))

    def _reader(self, fd: int) -> Reader:
        return bounded_reader(fd, self._key[3], self.path)

    def _eh_frame_from_segments(self, read, programs: list[tuple]) -> tuple[int, int, int] | None:
        # No section headers (sstrip): PT_GNU_EH_FRAME is .eh_frame_hdr, which points at
        # .eh_frame; the parser stops at its zero terminator or the end of its segment.
        for (p_type, _f, offset, vaddr, _p, filesz, _m, _a) in programs:
            if p_type != _PT_GNU_EH_FRAME:
                continue
            start = eh_frame_from_hdr(read("PT_GNU_EH_FRAME", min(filesz, 16), offset), vaddr)
            seg = None if start is None else self.segment_for(start)
            if seg is None or start >= seg.vaddr + seg.filesz:
                return None
            return (start, seg.offset + (start - seg.vaddr), seg.vaddr + seg.filesz - start)
        return None

    def _read_symbols(self) -> list[Symbol]:
        functions: list[Symbol] = []
        if not self._symtabs:
            return functions
        with open(self.path, "rb") as f:
            self._check_identity(f)
            read = self._reader(f.fileno())
            data = section_data
            for sh, strsh, versions in self._symtabs:
                is_dynsym = sh[1] == _SHT_DYNSYM
                hidden = None
                if versions is not None:
                    versym, verdef, verstr = versions
                    hidden = hidden_versions(data(read, versym, ".gnu.version"), data(read, verdef, ".gnu.version_d"),
                                              verdef[7], data(read, verstr, "the version string table"))
                table = data(read, sh, "a symbol table")
                table = table[: len(table) - len(table) % SYM64.size]
                functions.extend(read_functions(table, data(read, strsh, "a string table"), hidden, is_dynsym))
        return functions

    def object_address(self, name: str) -> int | None:
        """st_value of the defined data object NAME (STT_OBJECT: `_r_debug`, say), .dynsym first.

        Data objects are not kept like functions are: only the one asked for is searched, by
        its bytes in the string table, so a lookup costs a scan of the symbol tables, no parse.
        """
        ordered = sorted(self._symtabs, key=lambda entry: entry[0][1] != _SHT_DYNSYM)
        with open(self.path, "rb") as f:
            self._check_identity(f)
            read = self._reader(f.fileno())
            for sh, strsh, _versions in ordered:
                if sh[1] == _SHT_NOBITS or strsh[1] == _SHT_NOBITS:
                    continue
                strtab = read("a string table", strsh[5], strsh[4])
                table = read("a symbol table", sh[5], sh[4])
                value = object_value(table, strtab, name)
                if value is not None:
                    return value
        return None

    def _check_identity(self, f) -> None:
        # Bytes or symbols from a file rebuilt since it was first read would
        # silently disagree with everything derived earlier.
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._key[1:5]:
            raise ElfError(f"{self.path} changed on disk since it was first read")

    def _set_functions(self, functions: list[Symbol]) -> None:
        # Everything here is comprehensions and C-level sorts: per-entry
        # Python statements would cost more than reading the tables.
        # .symtab and .dynsym repeat the exported functions: keep one per
        # (name, address), the strongest binding (a later dict entry wins).
        ordered = [s for s in functions if s[3] == "local"]
        ordered += [s for s in functions if s[3] == "weak"]
        ordered += [s for s in functions if s[3] == "global"]
        kept = list({s[:2]: s for s in ordered}.values())
        kept.sort(key=_by_address)
        self._functions = kept
        self._addresses = [s[1] for s in kept]
        self._max_size = max([s[2] for s in kept], default=0)
        # Most names are unique: one dict of the first symbol of each name,
        # and full lists only for the few names defined more than once.
        self._first_by_name = {s[0]: s for s in reversed(kept)}
        multi: dict[str, list[Symbol]] = {}
        if len(self._first_by_name) != len(kept):
            for name, count in Counter([s[0] for s in kept]).items():
                if count > 1:
                    multi[name] = []
            for sym in kept:
                if sym[0] in multi:
                    multi[sym[0]].append(sym)
            for syms in multi.values():
                syms.sort(key=lookup_order)
        self._multi_by_name = multi

    # ----------------------------------------------------------------- queries

    def lookup(self, name: str) -> list[Symbol]:
        """Functions called NAME, global before weak before local."""
        self.functions  # noqa: B018 - loads the tables on first use
        multi = self._multi_by_name.get(name)
        if multi is not None:
            return list(multi)
        first = self._first_by_name.get(name)
        return [] if first is None else [first]

    def names(self) -> list[str]:
        """Every function name, once each."""
        self.functions  # noqa: B018
        return list(self._first_by_name)

    def function_containing(self, vaddr: int) -> Symbol | None:
        """The innermost function whose [address, address+size) holds VADDR.

        A size-0 symbol (hand-written assembly without .size) holds only its
        own address: guessing its end could attribute code to the wrong function.
        Aliases at the same address resolve to the most recognisable name.
        """
        funcs = self.functions
        i = bisect.bisect_right(self._addresses, vaddr) - 1
        while i >= 0:
            sym = funcs[i]
            if sym.address + self._max_size <= vaddr and sym.address != vaddr:
                break  # nothing further left can reach VADDR
            if sym.address <= vaddr < sym.address + sym.size or sym.address == vaddr:
                here = [
                    s for s in self.aliases(sym.address)
                    if vaddr < s.address + s.size or s.address == vaddr
                ]
                return min(here, key=lambda s: (s.size == 0, preference(s)))
            i -= 1
        return self._frame_containing(vaddr)

    def _frame_containing(self, vaddr: int) -> Symbol | None:
        frames = self.frame_functions
        i = bisect.bisect_right(self._frame_starts, vaddr) - 1
        if i < 0 or vaddr >= frames[i].address + frames[i].size:
            return None
        frame = frames[i]
        # A symbol without a size (assembly without .size) names the range its FDE gives it.
        named = self.aliases(frame.address)
        return min(named, key=preference)._replace(size=frame.size) if named else frame

    def aliases(self, vaddr: int) -> list[Symbol]:
        """Every function symbol starting exactly at VADDR."""
        funcs = self.functions
        lo = bisect.bisect_left(self._addresses, vaddr)
        hi = bisect.bisect_right(self._addresses, vaddr)
        return funcs[lo:hi]

    # --------------------------------------------------------------- addresses

    def segment_for(self, vaddr: int) -> Segment | None:
        """The PT_LOAD segment whose memory image holds VADDR."""
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
                return seg
        return None

    def is_executable(self, vaddr: int) -> bool:
        seg = self.segment_for(vaddr)
        return seg is not None and bool(seg.flags & PF_X)

    def vaddr_to_offset(self, vaddr: int) -> int:
        """File offset of link-time VADDR; ValueError if no file byte backs it."""
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
                return seg.offset + (vaddr - seg.vaddr)
        raise ValueError(f"{self.path}: address 0x{vaddr:x} is not backed by the file")

    def offset_to_vaddr(self, offset: int) -> int:
        """Link-time address of file OFFSET; ValueError if no PT_LOAD maps it."""
        for seg in self.segments:
            if seg.offset <= offset < seg.offset + seg.filesz:
                return seg.vaddr + (offset - seg.offset)
        raise ValueError(f"{self.path}: file offset 0x{offset:x} is not in a loadable segment")

    def read_vaddr(self, vaddr: int, size: int) -> bytes:
        """The file's bytes at link-time VADDR, as the loader maps them (bss reads as zeros)."""
        seg = self.segment_for(vaddr)
        if seg is None or vaddr + size > seg.vaddr + seg.memsz:
            raise ValueError(f"{self.path}: 0x{vaddr:x}+{size} is not inside one loadable segment")
        start = vaddr - seg.vaddr
        in_file = max(0, min(size, seg.filesz - start))
        with open(self.path, "rb") as f:
            self._check_identity(f)
            f.seek(seg.offset + start)
            data = f.read(in_file)
        if len(data) != in_file:
            raise ElfError(f"{self.path}: file truncated at offset 0x{seg.offset + start:x}")
        return data + bytes(size - in_file)

    def __repr__(self) -> str:
        return f"ElfFile({self.path!r})"


class CodeReader:
    """An ElfFile's code read segment by segment, each segment once: for decoding the entries of
    thousands of functions (`pyprobes list`) without a read per function. Only the file-backed
    bytes are read: code is never in a segment's zero-filled tail, which a corrupt file could make
    any size."""

    def __init__(self, elf: ElfFile) -> None:
        self.elf = elf
        self._segments: dict[int, bytes] = {}

    def read(self, vaddr: int, size: int) -> bytes:
        """Up to SIZE bytes at link-time VADDR (fewer at the end of the segment's file bytes)."""
        seg = self.elf.segment_for(vaddr)
        if seg is None:
            raise ValueError(f"{vaddr:#x} is in no loadable segment")
        data = self._segments.get(seg.vaddr)
        if data is None:
            data = self._segments[seg.vaddr] = self.elf.read_vaddr(seg.vaddr, seg.filesz)
        start = vaddr - seg.vaddr
        return data[start:start + size]
