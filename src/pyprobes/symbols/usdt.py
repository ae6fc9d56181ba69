"""USDT (SystemTap SDT) probes: the `.note.stapsdt` notes of a module and their argument specs.

A probe site is a `nop` the compiler left where the program calls `DTRACE_PROBE`/`STAP_PROBE`;
the note gives its address, an optional semaphore (a 2-byte counter the program tests before
preparing the arguments) and one spec per argument in the assembler's syntax: `SIZE@OPERAND`
where SIZE is 1, 2, 4 or 8 bytes, negative for a signed value, and OPERAND is `%reg`, `$imm`,
`disp(%base[,%index[,scale]])` or `symbol[+off](%rip)`.
Probes are read once per ElfFile (the ElfFile cache holds one per file identity).
"""
from __future__ import annotations

import fnmatch
import os
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import PyprobesError
from ..x86.registers import RegisterPart, register_part
from .elf import ElfFile
from .headers import bounded_reader, read_headers, section_data
from .maps import modules
from .notes import stapsdt_notes

__all__ = ["UsdtArg", "UsdtError", "UsdtListing", "UsdtProbe", "parse_arg", "parse_args", "usdt_probes",
           "usdt_probes_of_binary", "usdt_probes_of_process"]

MemoryReader = Callable[[int, int], bytes]


class UsdtError(PyprobesError, ValueError):
    """A malformed USDT argument spec."""


@dataclass(frozen=True)
class UsdtArg:
    """One argument: how to find its value at the probe site, and its size and sign."""

    text: str
    size: int  # bytes: 1, 2, 4 or 8
    signed: bool
    register: RegisterPart | None = None  # the value itself, or the base of a memory operand
    index: RegisterPart | None = None
    scale: int = 1
    displacement: int = 0  # the constant for `$imm`; else added to the address
    symbol: str | None = None  # `symbol(%rip)`: its link-time address is `address`
    address: int | None = None  # link-time; the operand is in memory at it (plus the load bias)
    in_memory: bool = False

    @property
    def is_constant(self) -> bool:
        return not self.in_memory and self.register is None

    def convert(self, raw: int) -> int:
        """RAW cut to the argument's size and read with its sign."""
        bits = 8 * self.size
        raw &= (1 << bits) - 1
        if self.signed and raw >> (bits - 1):
            raw -= 1 << bits
        return raw

    def value(self, regs: object, read: MemoryReader, load_bias: int = 0) -> int:
        """The argument at a hit: REGS the thread's registers, READ the tracee's memory."""
        if not self.in_memory:
            raw = self.displacement if self.register is None else self.register.value(regs)
            return self.convert(raw)
        if self.address is not None:
            where = self.address + load_bias + self.displacement
        else:
            assert self.register is not None
            where = self.register.value(regs) + self.displacement
            if self.index is not None:
                where += self.index.value(regs) * self.scale
        where &= (1 << 64) - 1
        return self.convert(int.from_bytes(read(where, self.size), "little"))


@dataclass(frozen=True)
class UsdtProbe:
    """A USDT probe of one ELF file; addresses link-time, already adjusted for prelink."""

    provider: str
    name: str
    address: int
    semaphore: int  # 0: none
    args_text: str
    args: tuple[UsdtArg, ...]

    @property
    def full_name(self) -> str:
        return f"{self.provider}:{self.name}"

    def arguments(self, regs: object, read: MemoryReader, load_bias: int = 0) -> list[int]:
        return [arg.value(regs, read, load_bias) for arg in self.args]


_REG = r"%([a-z0-9]+)"
_NUM = r"[-+]?(?:0[xX][0-9a-fA-F]+|[0-9]+)"
_ARG = re.compile(r"(?:([-+]?\d+)@)?(.+)\Z")
_MEMORY = re.compile(
    rf"(?P<disp>{_NUM}|[A-Za-z_.$][\w.$@]*(?:[-+]{_NUM})?)?"
    rf"\((?:{_REG})?(?:,{_REG}(?:,(?P<scale>[1248]))?)?\)\Z"
)


def _reg(name: str, text: str) -> RegisterPart:
    part = register_part(name)
    if part is None:
        raise UsdtError(f"unknown register %{name} in USDT argument {text!r}")
    return part


def parse_arg(text: str, lookup: Callable[[str], int | None] | None = None) -> UsdtArg:
    """One spec ("-4@%edi", "8@-16(%rbp)", "4@$5", "8@foo+8(%rip)"). LOOKUP gives a symbol's
    link-time address for a `symbol(%rip)` operand. UsdtError when malformed."""
    m = _ARG.match(text)
    if m is None:
        raise UsdtError(f"bad USDT argument {text!r}")
    size_text, operand = m.groups()
    size = abs(int(size_text)) if size_text else 8
    signed = bool(size_text) and size_text.startswith("-")
    if size not in (1, 2, 4, 8):
        raise UsdtError(f"bad size {size_text} in USDT argument {text!r}: expected 1, 2, 4 or 8")
    if operand.startswith("$"):
        try:
            return UsdtArg(text, size, signed, displacement=int(operand[1:], 0))
        except ValueError:
            raise UsdtError(f"bad constant in USDT argument {text!r}") from None
    if operand.startswith("%"):
        part = _reg(operand[1:], text)
        return UsdtArg(text, size, signed, register=part)
    mm = _MEMORY.match(operand)
    if mm is None:
        raise UsdtError(f"bad operand in USDT argument {text!r}")
    disp_text, base, index, scale = mm.group("disp"), mm.group(2), mm.group(3), mm.group("scale")
    disp, symbol = 0, None
    if disp_text:
        if re.fullmatch(_NUM, disp_text):
            disp = int(disp_text, 0) if not re.fullmatch(r"[-+]?0\d+", disp_text) else int(disp_text, 10)
        else:
            sm = re.fullmatch(rf"([A-Za-z_.$][\w.$@]*)({_NUM})?", disp_text)
            assert sm is not None
            symbol, off = sm.group(1), sm.group(2)
            disp = int(off, 0) if off else 0
    if symbol is not None or (base and base.lower() == "rip"):
        if base is None or base.lower() != "rip" or index:
            raise UsdtError(f"USDT argument {text!r}: a symbol operand must be %rip-relative")
        if symbol is None:
            raise UsdtError(f"USDT argument {text!r}: %rip-relative with no symbol")
        address = lookup(symbol) if lookup is not None else None
        if address is None:
            raise UsdtError(f"USDT argument {text!r}: no symbol {symbol!r} in the module")
        return UsdtArg(text, size, signed, displacement=disp, symbol=symbol, address=address, in_memory=True)
    if base is None:
        raise UsdtError(f"USDT argument {text!r}: a memory operand needs a base register")
    return UsdtArg(text, size, signed, register=_reg(base, text),
                   index=_reg(index, text) if index else None, scale=int(scale or 1),
                   displacement=disp, in_memory=True)


def parse_args(text: str, lookup: Callable[[str], int | None] | None = None) -> tuple[UsdtArg, ...]:
    """The space-separated specs of a note."""
    return tuple(parse_arg(part, lookup) for part in text.split())


_probes: "weakref.WeakKeyDictionary[ElfFile, list[UsdtProbe]]" = weakref.WeakKeyDictionary()


def _lookup(elf: ElfFile) -> Callable[[str], int | None]:
    def lookup(name: str) -> int | None:
        address = elf.object_address(name)
        if address is None:
            syms = elf.lookup(name)
            address = syms[0].address if syms else None
        return address
    return lookup


def usdt_probes(elf: ElfFile) -> list[UsdtProbe]:
    """The USDT probes ELF declares, in note order. A probe whose argument specs cannot be
    parsed is kept with no args (its site is still a valid probe point)."""
    hit = _probes.get(elf)
    if hit is not None:
        return hit
    notes, base_addr = _read_notes(elf.path)
    lookup = _lookup(elf)
    out = []
    for note in notes:
        # Prelink moves the code and records by how much only in .stapsdt.base's address.
        adjust = base_addr - note.base if (base_addr is not None and note.base) else 0
        try:
            args = parse_args(note.args, lookup)
        except UsdtError:
            args = ()
        out.append(UsdtProbe(note.provider, note.name, note.pc + adjust,
                             note.semaphore + adjust if note.semaphore else 0, note.args, args))
    _probes[elf] = out
    return out


def _read_notes(path: str) -> tuple[list, int | None]:
    fd = os.open(path, os.O_RDONLY)
    try:
        read = bounded_reader(fd, os.fstat(fd).st_size, path)
        _e_type, _programs, sections, shstrndx = read_headers(fd, read, path)
        if not 0 < shstrndx < len(sections):
            return [], None
        names = section_data(read, sections[shstrndx], "the section name table")
        notes, base_addr = [], None
        for sh in sections:
            name = names[sh[0] : names.find(b"\0", sh[0])] if sh[0] < len(names) else b""
            if name == b".note.stapsdt":
                notes.extend(stapsdt_notes(section_data(read, sh, "the .note.stapsdt section")))
            elif name == b".stapsdt.base":
                base_addr = sh[3]
        return notes, base_addr
    finally:
        os.close(fd)


@dataclass(frozen=True)
class UsdtListing:
    """One row of `pyprobes list --usdt`: addresses link-time for a binary, runtime for a process."""

    module: str
    address: int
    provider: str
    name: str
    semaphore: int  # 0: none
    args: str


def _matches(probe: UsdtProbe, pattern: str | None) -> bool:
    return pattern is None or fnmatch.fnmatchcase(probe.full_name, pattern) \
        or fnmatch.fnmatchcase(probe.name, pattern)


def usdt_probes_of_binary(path: str, pattern: str | None = None) -> list[UsdtListing]:
    """The USDT probes PATH declares (PATTERN: a glob on PROVIDER:NAME or NAME)."""
    elf = ElfFile.load(path)
    name = os.path.basename(path)
    return [UsdtListing(name, p.address, p.provider, p.name, p.semaphore, p.args_text)
            for p in usdt_probes(elf) if _matches(p, pattern)]


def usdt_probes_of_process(pid: int, pattern: str | None = None) -> list[UsdtListing]:
    """The USDT probes of every module process PID maps, at runtime addresses."""
    out, seen = [], set()
    for mod in modules(pid):
        if mod.path in seen:
            continue
        seen.add(mod.path)
        for p in usdt_probes(mod.elf):
            if _matches(p, pattern):
                out.append(UsdtListing(mod.name, mod.to_runtime(p.address), p.provider, p.name,
                                       mod.to_runtime(p.semaphore) if p.semaphore else 0, p.args_text))
    return out
