"""One ELF file on disk: its loadable segments, its function symbols, its ids.

Everything pyprobes needs to turn a name into a link-time address (and back)
and to read the file's own bytes at a link-time address. Symbol tables are
read in bulk with ``struct.iter_unpack``: pyelftools' ``iter_symbols()``
builds one object per symbol and costs 80 ms for libc (0.5 s for libpython),
which a user pays on every attach.
"""
from __future__ import annotations

import bisect
import operator
import os
import stat
import struct
import zlib
from collections import Counter, OrderedDict
from pathlib import Path
from typing import NamedTuple

from ..errors import PyprobesError

__all__ = [
    "ElfError",
    "ElfFile",
    "Segment",
    "Symbol",
    "find_debug_file",
]

DEFAULT_DEBUG_ROOT = "/usr/lib/debug"

# The headers are few and fixed-layout, so they are unpacked here directly:
# pyelftools builds an object per section (and parses the hash tables while
# at it), 25 ms of libc's load for nothing this module uses.
_EHDR = struct.Struct("<HHIQQQIHHHHHH")  # after the 16-byte e_ident
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")  # name type flags addr offset size link info align entsize
_ET_DYN = 3
_PT_LOAD = 1
_PT_NOTE = 4
_PT_GNU_EH_FRAME = 0x6474E550
_SHT_SYMTAB = 2
_SHT_NOTE = 7
_SHT_NOBITS = 8
_SHT_DYNSYM = 11
_SHT_GNU_VERDEF = 0x6FFFFFFD
_SHT_GNU_VERSYM = 0x6FFFFFFF
# Elf64_Sym: st_name, st_info, st_other, st_shndx, st_value, st_size.
_SYM64 = struct.Struct("<IBBHQQ")
_STT_OBJECT = 1
_STT_FUNC = 2
_STT_GNU_IFUNC = 10
_SHN_UNDEF = 0
_BINDINGS = {0: "local", 1: "global", 2: "weak", 10: "global"}  # 10 = STB_GNU_UNIQUE
# st_info -> (binding, kind) for the entries kept: defined functions only.
_INFO_TABLE = {
    (bind << 4) | stype: (name, "ifunc" if stype == _STT_GNU_IFUNC else "func")
    for bind, name in _BINDINGS.items()
    for stype in (_STT_FUNC, _STT_GNU_IFUNC)
}
_NT_GNU_BUILD_ID = 3
_VERSYM_HIDDEN = 0x8000
PF_X = 1
# x86-64 user space ends at 2**47 (2**56 with 5-level paging): a segment beyond it cannot be loaded.
_ADDRESS_SPACE_END = 1 << 57


class ElfError(PyprobesError, ValueError):
    """The file is not an ELF file pyprobes can use (or is corrupt)."""


class Symbol(NamedTuple):
    """A function symbol. ``address`` is the link-time st_value, not a runtime address."""

    name: str
    address: int
    size: int
    binding: str  # "global", "weak" or "local"
    kind: str = "func"  # "ifunc": the address is the resolver, not the implementation


class Segment(NamedTuple):
    """A PT_LOAD program header."""

    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int  # PF_X=1, PF_W=2, PF_R=4


_BINDING_RANK = {"global": 0, "weak": 1, "local": 2}


def preference(sym: Symbol) -> tuple:
    """Sort key choosing the best of several names for one address.

    A user recognises the exported name (``puts``, weak in glibc) sooner than
    an internal alias (``_IO_puts``, global), and an unversioned name sooner
    than an old version: underscores count before binding.
    """
    name = sym.name
    return (
        "@" in name,
        len(name) - len(name.lstrip("_")),
        _BINDING_RANK.get(sym.binding, 3),
        len(name),
        name,
    )


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


def _rank_address(s: Symbol) -> tuple:
    return (_BINDING_RANK[s[3]], s[1])


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

    def _read_frames(self) -> list[Symbol]:
        from .ehframe import fde_ranges  # ehframe imports this module (ElfError)

        if self._eh_frame is None or not self.segments:
            return []  # a relocatable file's FDEs hold unrelocated addresses
        vaddr, offset, size = self._eh_frame
        with open(self.path, "rb") as f:
            self._check_identity(f)
            data = self._reader(f.fileno())(".eh_frame", size, offset)
        ranges = []
        try:
            ranges.extend(fde_ranges(data, vaddr, self._got))
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
        ident = os.pread(fd, 64, 0)
        if len(ident) < 64 or ident[:4] != b"\x7fELF":
            raise ElfError(f"{self.path}: not an ELF file")
        if ident[4] != 2 or ident[5] != 1:
            raise ElfError(f"{self.path}: only 64-bit little-endian ELF files are supported")
        (e_type, _machine, _version, _entry, phoff, shoff, _flags, _ehsize,
         phentsize, phnum, shentsize, shnum, shstrndx) = _EHDR.unpack_from(ident, 16)
        self.is_pie_or_shared = e_type == _ET_DYN

        sections: list[tuple] = []
        if shoff:
            if shentsize < _SHDR.size:
                raise ElfError(f"{self.path}: corrupt ELF header: section header size {shentsize} < {_SHDR.size}")
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
                raise ElfError(f"{self.path}: corrupt ELF header: program header size {phentsize} < {_PHDR.size}")
            table = read(f"the program header table ({phnum} entries)", phentsize * phnum, phoff)
            programs = [_PHDR.unpack_from(table, i * phentsize) for i in range(phnum)]

        self.segments = tuple(
            Segment(vaddr, memsz, offset, filesz, flags)
            for (p_type, flags, offset, vaddr, _paddr, filesz, memsz, _align) in programs
            if p_type == _PT_LOAD
        )
        self._check_segments()

        shstrtab = b""
        if 0 < shstrndx < len(sections):
            shstrtab = self._section_data(read, sections[shstrndx], "the section name table")

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
                    self.build_id = _build_id(self._section_data(read, sh, "a note section"))
            else:
                name = name_of(sh)
                if name == b".gnu_debuglink":
                    self.debuglink = _debuglink(self._section_data(read, sh, name.decode()))
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
                    self.build_id = _build_id(read("a PT_NOTE segment", filesz, offset))
        if self._eh_frame is None:
            self._eh_frame = self._eh_frame_from_segments(read, programs)

        # Only where the symbols are is noted now; see ``functions``.
        self._symtabs = []
        for sh in symtabs:
            if not 0 < sh[6] < len(sections) or sh[9] not in (0, _SYM64.size):
                continue
            versions = None
            if sh[1] == _SHT_DYNSYM and versym is not None and verdef is not None and 0 < verdef[6] < len(sections):
                versions = (versym, verdef, sections[verdef[6]])
            self._symtabs.append((sh, sections[sh[6]], versions))

    def _reader(self, fd: int):
        """read(what, size, offset): SIZE bytes of the file at OFFSET, or an ElfError naming WHAT
        if they are not all in the file. Every size read from the file is checked against the
        file's size first: a corrupt size must not become a huge allocation."""
        file_size = self._key[3]
        path = self.path

        def read(what: str, size: int, offset: int) -> bytes:
            if offset > file_size or size > file_size - offset:
                raise ElfError(f"{path}: {what} (0x{size:x} bytes at offset 0x{offset:x}) "
                               f"lies past the end of the file (0x{file_size:x} bytes)")
            return _pread_exact(fd, size, offset)

        return read

    @staticmethod
    def _section_data(read, sh: tuple, what: str) -> bytes:
        return b"" if sh[1] == _SHT_NOBITS else read(what, sh[5], sh[4])

    def _check_segments(self) -> None:
        file_size = self._key[3]
        end = 0
        for seg in self.segments:
            where = f"{self.path}: corrupt PT_LOAD segment at 0x{seg.vaddr:x}"
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

    def _eh_frame_from_segments(self, read, programs: list[tuple]) -> tuple[int, int, int] | None:
        # No section headers (sstrip): PT_GNU_EH_FRAME is .eh_frame_hdr, which points at
        # .eh_frame; the parser stops at its zero terminator or the end of its segment.
        from .ehframe import eh_frame_from_hdr

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
            data = self._section_data
            for sh, strsh, versions in self._symtabs:
                is_dynsym = sh[1] == _SHT_DYNSYM
                hidden = None
                if versions is not None:
                    versym, verdef, verstr = versions
                    hidden = _hidden_versions(data(read, versym, ".gnu.version"), data(read, verdef, ".gnu.version_d"),
                                              verdef[7], data(read, verstr, "the version string table"))
                table = data(read, sh, "a symbol table")
                table = table[: len(table) - len(table) % _SYM64.size]
                functions.extend(_read_functions(table, data(read, strsh, "a string table"), hidden, is_dynsym))
        return functions

    def object_address(self, name: str) -> int | None:
        """st_value of the defined data object NAME (STT_OBJECT: `_r_debug`, say), .dynsym first.

        Data objects are not kept like functions are: only the one asked for is searched, by
        its bytes in the string table, so a lookup costs a scan of the symbol tables, no parse.
        """
        wanted = name.encode() + b"\0"
        ordered = sorted(self._symtabs, key=lambda entry: entry[0][1] != _SHT_DYNSYM)
        with open(self.path, "rb") as f:
            self._check_identity(f)
            read = self._reader(f.fileno())
            for sh, strsh, _versions in ordered:
                if sh[1] == _SHT_NOBITS or strsh[1] == _SHT_NOBITS:
                    continue
                strtab = read("a string table", strsh[5], strsh[4])
                table = read("a symbol table", sh[5], sh[4])
                for st_name, info, _other, shndx, value, _size in _SYM64.iter_unpack(
                        table[: len(table) - len(table) % _SYM64.size]):
                    if shndx and info & 0xF == _STT_OBJECT and strtab.startswith(wanted, st_name):
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
                syms.sort(key=_rank_address)
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


def _read_functions(
    data: bytes, strtab: bytes, hidden: dict[int, str] | None, is_dynsym: bool
) -> list[Symbol]:
    # Per-entry Python work is the whole cost here (thousands of entries), so
    # everything is a comprehension over precomputed tables, and names are
    # sliced from one decoded string instead of decoded one by one.
    rows = _SYM64.iter_unpack(data)
    if is_dynsym and hidden:
        rows = list(rows)
        picked = [i for i, e in enumerate(rows) if e[3] != _SHN_UNDEF and e[1] in _INFO_TABLE]
        entries = [rows[i] for i in picked]
    else:
        picked = None
        entries = [e for e in rows if e[3] != _SHN_UNDEF and e[1] in _INFO_TABLE]
    if strtab.isascii():
        text = strtab.decode("ascii")
        find = text.find
        names = [text[e[0] : find("\0", e[0])] for e in entries]
    else:
        find = strtab.find
        names = [strtab[e[0] : find(b"\0", e[0])].decode("utf-8", "replace") for e in entries]
    if picked is not None:
        # An old version of a symbol (memcpy@GLIBC_2.2.5) is what the dynamic
        # linker never binds a new reference to; name it as .symtab does, so
        # that "memcpy" means the default version.
        names = [f"{n}@{hidden[i]}" if i in hidden else n for n, i in zip(names, picked)]
    elif not is_dynsym:
        names = [n[: n.index("@@")] if "@@" in n else n for n in names]  # default version: plain name
    new = tuple.__new__
    info = _INFO_TABLE
    return [new(Symbol, (n, e[4], e[5]) + info[e[1]]) for n, e in zip(names, entries) if n]


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ElfError(f"truncated ELF file: wanted {size} bytes at 0x{offset:x}")
    return data


def _hidden_versions(versym: bytes, data: bytes, count: int, strtab: bytes) -> dict[int, str]:
    """dynsym index -> version name, for symbols whose version is not the default."""
    names: dict[int, str] = {}
    off = 0
    for _ in range(count or 1 << 16):
        if off + 20 > len(data):
            break
        _ver, _flags, ndx, cnt, _hash, aux, nxt = struct.unpack_from("<HHHHIII", data, off)
        if cnt and off + aux + 4 <= len(data):
            (name_off,) = struct.unpack_from("<I", data, off + aux)
            names[ndx] = strtab[name_off : strtab.find(b"\0", name_off)].decode("utf-8", "replace")
        if not nxt:
            break
        off += nxt
    hidden = {}
    for index, (v,) in enumerate(struct.iter_unpack("<H", versym)):
        if v & _VERSYM_HIDDEN and (v & 0x7FFF) in names:
            hidden[index] = names[v & 0x7FFF]
    return hidden


def _iter_notes(data: bytes):
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off : off + namesz]
        off += (namesz + 3) & ~3
        desc = data[off : off + descsz]
        off += (descsz + 3) & ~3
        yield name.rstrip(b"\0"), ntype, desc


def _build_id(data: bytes) -> str | None:
    # Note types are per owner: type 3 is also NT_STAPSDT (USDT probes,
    # owner "stapsdt"), so the owner name must be checked too.
    for name, ntype, desc in _iter_notes(data):
        if name == b"GNU" and ntype == _NT_GNU_BUILD_ID and desc:
            return desc.hex()
    return None


def _debuglink(data: bytes) -> tuple[str, int] | None:
    end = data.find(b"\0")
    if end <= 0:
        return None
    crc_at = (end + 4) & ~3  # name, NUL, padding to 4, then the CRC
    if crc_at + 4 > len(data):
        return None
    (crc,) = struct.unpack_from("<I", data, crc_at)
    return data[:end].decode("utf-8", "replace"), crc


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def find_debug_file(elf: ElfFile, debug_root: str = DEFAULT_DEBUG_ROOT) -> Path | None:
    """The separate debug file of ELF, as gdb looks for it; None if there is none.

    Order: DEBUG_ROOT/.build-id/xx/rest.debug, then the .gnu_debuglink name
    next to the binary, in its .debug/ subdirectory, and under
    DEBUG_ROOT/<binary's directory>. A candidate must carry the same build-id
    (or, without one, match the debuglink CRC): a stale debug file would give
    wrong addresses.
    """
    own = Path(elf.path)
    try:
        own_id = own.stat()
    except OSError:
        own_id = None

    def is_self(p: Path) -> bool:
        try:
            st = p.stat()
        except OSError:
            return True
        return own_id is not None and (st.st_dev, st.st_ino) == (own_id.st_dev, own_id.st_ino)

    if elf.build_id and len(elf.build_id) > 2:
        p = Path(debug_root, ".build-id", elf.build_id[:2], elf.build_id[2:] + ".debug")
        if p.is_file() and not is_self(p) and _same_build_id(p, elf.build_id):
            return p
    if elf.debuglink:
        name, crc = elf.debuglink
        directory = Path(os.path.realpath(elf.path)).parent
        for p in (
            directory / name,
            directory / ".debug" / name,
            Path(debug_root + str(directory)) / name,
        ):
            if not p.is_file() or is_self(p):
                continue
            if elf.build_id:
                if _same_build_id(p, elf.build_id):
                    return p
            elif _file_crc(p) == crc:
                return p
    return None


def _same_build_id(path: Path, build_id: str) -> bool:
    try:
        return ElfFile.load(path).build_id == build_id
    except (ElfError, OSError):
        return False
