"""Call frame information from .eh_frame (and .debug_frame): for a pc, where its caller's frame is.

Each FDE holds call frame instructions that, run from the function's start up to a pc, build
one row of the DWARF CFA table (DWARF 5, section 6.4): the canonical frame address (CFA) as a
register plus an offset, and for each saved register a rule saying where its caller's value
is. An unwinder needs only that row. Register numbers are DWARF's; what they name is the
architecture's business (x86/dwarfregs.py).

Records are read with ehframe.py's bounded record reader, so a corrupt section ends in an
ElfError for that record, never a hang. A module's FDEs are parsed once (``cfi_of``) and a
row, once computed, is kept per pc. .debug_frame (DWARF's own layout: CIE id 0xffffffff,
CIE pointers from the section's start, absolute addresses) adds the functions .eh_frame
does not cover, as gdb reads both; it may be in the file or in its separate debug file.
"""
from __future__ import annotations

import bisect
import os
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

from .ehframe import (DW_EH_PE_absptr, DW_EH_PE_omit, _U32, _leb, _record, _Unsupported,
                      read_encoded)
from .headers import ElfError, bounded_reader, read_headers, section_data

__all__ = ["Rule", "Row", "CfiTable", "cfi_of", "parse_cfi", "evaluate_expression"]

# Rule kinds for a saved register.
UNDEFINED = "undefined"       # the caller's value is lost (e.g. the return address of the outermost frame)
SAME = "same"                 # the register still holds it
OFFSET = "offset"             # saved at CFA + n
VAL_OFFSET = "val_offset"     # the value is CFA + n
REGISTER = "register"         # held in register n
EXPRESSION = "expression"     # saved at the address a DWARF expression computes
VAL_EXPRESSION = "val_expression"


class Rule(NamedTuple):
    kind: str
    value: int | bytes = 0


@dataclass(frozen=True)
class Row:
    """One row of the CFA table. CFA = register ``cfa_register`` + ``cfa_offset``, or the value
    of ``cfa_expression`` when it is set. ``rules`` has an entry per register with a rule other
    than "same value"; ``return_register`` names the column holding the return address.
    ``signal_frame`` (augmentation 'S'): the frame a signal handler returns through, whose
    caller's pc is where the signal interrupted it, not a return address."""

    cfa_register: int
    cfa_offset: int
    rules: dict[int, Rule]
    return_register: int
    cfa_expression: bytes | None = None
    signal_frame: bool = False


@dataclass
class _Cie:
    code_align: int
    data_align: int
    return_register: int
    encoding: int
    initial: bytes
    signal_frame: bool = False
    has_length: bool = True  # 'z': each FDE has an augmentation data length


@dataclass
class _Fde:
    start: int
    end: int
    cie: _Cie
    instructions: bytes


# Call frame instruction opcodes (DWARF 5, 6.4.2; GNU extensions).
_ADVANCE_LOC, _OFFSET, _RESTORE = 0x1, 0x2, 0x3  # in the high two bits
_NOP, _SET_LOC, _ADVANCE_LOC1, _ADVANCE_LOC2, _ADVANCE_LOC4 = 0x00, 0x01, 0x02, 0x03, 0x04
_OFFSET_EXTENDED, _RESTORE_EXTENDED, _UNDEFINED, _SAME_VALUE, _REGISTER = 0x05, 0x06, 0x07, 0x08, 0x09
_REMEMBER_STATE, _RESTORE_STATE, _DEF_CFA, _DEF_CFA_REGISTER, _DEF_CFA_OFFSET = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
_DEF_CFA_EXPRESSION, _EXPRESSION, _OFFSET_EXTENDED_SF, _DEF_CFA_SF, _DEF_CFA_OFFSET_SF = 0x0F, 0x10, 0x11, 0x12, 0x13
_VAL_OFFSET, _VAL_OFFSET_SF, _VAL_EXPRESSION = 0x14, 0x15, 0x16
_GNU_ARGS_SIZE, _GNU_NEGATIVE_OFFSET_EXTENDED = 0x2E, 0x2F

_STATE_DEPTH = 64  # remember_state nesting; more is corruption


_DEBUG_FRAME_CIE_ID = 0xFFFFFFFF


def _parse_cie(data: bytes, cie: int, cie_id: int = 0) -> _Cie | None:
    rec = _record(data, cie)
    if rec is None:
        raise ElfError(f"corrupt .eh_frame: an FDE points at offset 0x{cie:x}, which holds no CIE")
    body, end, _length = rec
    if _U32.unpack_from(data, body)[0] != cie_id:
        raise ElfError(f"corrupt .eh_frame: an FDE points at offset 0x{cie:x}, which holds another FDE")
    p = body + 4
    if p >= end:
        raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} is empty")
    version = data[p]
    nul = data.find(b"\0", p + 1, end)
    if nul < 0:
        raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} has an unterminated augmentation")
    augmentation = data[p + 1:nul]
    p = nul + 1
    if version not in (1, 3, 4):
        raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} has version {version}")
    if augmentation.startswith(b"eh"):
        p += 8
    if version == 4:
        p += 2
    code_align, p = _leb(data, p, end, signed=False)
    data_align, p = _leb(data, p, end, signed=True)
    if version == 1:
        if p >= end:
            raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} is truncated")
        return_register = data[p]
        p += 1
    else:
        return_register, p = _leb(data, p, end, signed=False)
    encoding = DW_EH_PE_absptr
    signal_frame = False
    if augmentation.startswith(b"z"):
        size, p = _leb(data, p, end, signed=False)
        stop = p + size
        if stop > end:
            raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} has augmentation data past its end")
        q = p
        for letter in augmentation[1:]:
            if q >= stop and letter in b"LPR":
                raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} has too little augmentation data")
            if letter == ord("R"):
                encoding = data[q]
                q += 1
            elif letter == ord("L"):
                q += 1
            elif letter == ord("P"):
                try:
                    _value, q = read_encoded(data, q + 1, stop, data[q] & 0x7F, 0, 0)
                except _Unsupported:
                    return None
            elif letter == ord("S"):
                signal_frame = True
            elif letter not in b"BG":
                break
        p = stop
    elif augmentation not in (b"", b"eh"):
        return None  # without 'z' an unknown augmentation hides where the instructions start
    if encoding == DW_EH_PE_omit:
        return None
    return _Cie(code_align, data_align, return_register, encoding, data[p:end], signal_frame,
                augmentation.startswith(b"z"))


def parse_cfi(data: bytes, section_vaddr: int, data_base: int = 0,
              debug_frame: bool = False) -> tuple[list[_Fde], str | None]:
    """Every FDE of the .eh_frame bytes DATA (loaded at link-time SECTION_VADDR), or of the
    .debug_frame bytes DATA when DEBUG_FRAME, sorted by start, and what was wrong if a corrupt
    record stopped the walk (the FDEs before it are kept)."""
    cie_id = _DEBUG_FRAME_CIE_ID if debug_frame else 0
    cies: dict[int, _Cie | None] = {}
    fdes: list[_Fde] = []
    error = None
    pos = 0
    try:
        while True:
            rec = _record(data, pos)
            if rec is None:
                break
            body, end, _length = rec
            (cie_pointer,) = _U32.unpack_from(data, body)
            if cie_pointer != cie_id:
                cie_at = cie_pointer if debug_frame else body - cie_pointer
                if cie_at < 0:
                    raise ElfError(f"corrupt .eh_frame: FDE at offset 0x{pos:x} points before the section")
                if cie_at not in cies:
                    cies[cie_at] = _parse_cie(data, cie_at, cie_id)
                cie = cies[cie_at]
                if cie is not None:
                    p = body + 4
                    try:
                        start, p = read_encoded(data, p, end, cie.encoding, section_vaddr + p, data_base)
                        size, p = read_encoded(data, p, end, cie.encoding & 0x0F, 0, 0)
                    except _Unsupported:
                        cies[cie_at] = None
                    else:
                        aug_size = 0
                        if cie.has_length:
                            aug_size, p = _leb(data, p, end, signed=False)
                        if size:
                            fdes.append(_Fde(start, start + size, cie, data[p + aug_size:end]))
            pos = end
    except ElfError as e:
        error = str(e)
    fdes.sort(key=lambda f: f.start)
    return fdes, error


class _State:
    __slots__ = ("cfa_register", "cfa_offset", "cfa_expression", "rules")

    def __init__(self) -> None:
        self.cfa_register = -1
        self.cfa_offset = 0
        self.cfa_expression: bytes | None = None
        self.rules: dict[int, Rule] = {}

    def copy(self) -> _State:
        s = _State()
        s.cfa_register, s.cfa_offset, s.cfa_expression = self.cfa_register, self.cfa_offset, self.cfa_expression
        s.rules = dict(self.rules)
        return s


def _execute(code: bytes, cie: _Cie, state: _State, initial: dict[int, Rule] | None,
             loc: int, pc: int) -> int | None:
    """Run CODE on STATE while the location stays at or before PC. Returns the location reached,
    or None when an advance passed PC (the row is complete)."""
    n = len(code)
    p = 0
    stack: list[_State] = []
    ca, da = cie.code_align, cie.data_align

    def uleb() -> int:
        nonlocal p
        v, p = _leb(code, p, n, signed=False)
        return v

    def sleb() -> int:
        nonlocal p
        v, p = _leb(code, p, n, signed=True)
        return v

    def block() -> bytes:
        nonlocal p
        size = uleb()
        if p + size > n:
            raise ElfError("corrupt .eh_frame: an expression runs past its FDE")
        b = code[p:p + size]
        p += size
        return b

    def restored(reg: int) -> None:
        rule = (initial or {}).get(reg)
        if rule is None:
            state.rules.pop(reg, None)
        else:
            state.rules[reg] = rule

    while p < n:
        op = code[p]
        p += 1
        high, low = op >> 6, op & 0x3F
        delta = None
        if high == _ADVANCE_LOC:
            delta = low * ca
        elif high == _OFFSET:
            state.rules[low] = Rule(OFFSET, uleb() * da)
        elif high == _RESTORE:
            restored(low)
        elif op == _NOP:
            pass
        elif op == _ADVANCE_LOC1 or op == _ADVANCE_LOC2 or op == _ADVANCE_LOC4:
            size = {_ADVANCE_LOC1: 1, _ADVANCE_LOC2: 2, _ADVANCE_LOC4: 4}[op]
            if p + size > n:
                raise ElfError("corrupt .eh_frame: advance_loc runs past its FDE")
            delta = int.from_bytes(code[p:p + size], "little") * ca
            p += size
        elif op == _SET_LOC:
            return None  # not emitted by gcc or clang for .eh_frame: stop here rather than guess
        elif op == _OFFSET_EXTENDED:
            reg = uleb()
            state.rules[reg] = Rule(OFFSET, uleb() * da)
        elif op == _OFFSET_EXTENDED_SF:
            reg = uleb()
            state.rules[reg] = Rule(OFFSET, sleb() * da)
        elif op == _GNU_NEGATIVE_OFFSET_EXTENDED:
            reg = uleb()
            state.rules[reg] = Rule(OFFSET, -uleb() * da)
        elif op == _RESTORE_EXTENDED:
            restored(uleb())
        elif op == _UNDEFINED:
            state.rules[uleb()] = Rule(UNDEFINED)
        elif op == _SAME_VALUE:
            state.rules.pop(uleb(), None)
        elif op == _REGISTER:
            reg = uleb()
            state.rules[reg] = Rule(REGISTER, uleb())
        elif op == _REMEMBER_STATE:
            if len(stack) >= _STATE_DEPTH:
                raise ElfError("corrupt .eh_frame: remember_state nested too deep")
            stack.append(state.copy())
        elif op == _RESTORE_STATE:
            if not stack:
                raise ElfError("corrupt .eh_frame: restore_state with nothing remembered")
            saved = stack.pop()
            # The CFA rule comes back with the register rules, as in gcc's unwinder and
            # readelf: gcc's epilogues in the middle of a function rely on it.
            state.cfa_register, state.cfa_offset = saved.cfa_register, saved.cfa_offset
            state.cfa_expression, state.rules = saved.cfa_expression, saved.rules
        elif op == _DEF_CFA:
            state.cfa_register = uleb()
            state.cfa_offset = uleb()
            state.cfa_expression = None
        elif op == _DEF_CFA_SF:
            state.cfa_register = uleb()
            state.cfa_offset = sleb() * da
            state.cfa_expression = None
        elif op == _DEF_CFA_REGISTER:
            state.cfa_register = uleb()
            state.cfa_expression = None
        elif op == _DEF_CFA_OFFSET:
            state.cfa_offset = uleb()
        elif op == _DEF_CFA_OFFSET_SF:
            state.cfa_offset = sleb() * da
        elif op == _DEF_CFA_EXPRESSION:
            state.cfa_expression = block()
        elif op == _EXPRESSION:
            reg = uleb()
            state.rules[reg] = Rule(EXPRESSION, block())
        elif op == _VAL_EXPRESSION:
            reg = uleb()
            state.rules[reg] = Rule(VAL_EXPRESSION, block())
        elif op == _VAL_OFFSET:
            reg = uleb()
            state.rules[reg] = Rule(VAL_OFFSET, uleb() * da)
        elif op == _VAL_OFFSET_SF:
            reg = uleb()
            state.rules[reg] = Rule(VAL_OFFSET, sleb() * da)
        elif op == _GNU_ARGS_SIZE:
            uleb()
        else:
            raise ElfError(f"corrupt .eh_frame: unknown call frame instruction 0x{op:02x}")
        if delta is not None:
            if loc + delta > pc:
                return None
            loc += delta
    return loc


# DWARF expression opcodes enough for the PLT's CFA expression and simple register-relative ones.
_OP_LIT0, _OP_LIT31, _OP_BREG0, _OP_BREG31 = 0x30, 0x4F, 0x70, 0x8F
_OP_CONST1U, _OP_CONST1S, _OP_CONST2U, _OP_CONST2S, _OP_CONST4U, _OP_CONST4S = 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D
_OP_CONST8U, _OP_CONSTU, _OP_CONSTS, _OP_PLUS_UCONST = 0x0E, 0x10, 0x11, 0x23
_OP_DEREF = 0x06
_BINARY = {0x1A: lambda a, b: a & b, 0x1C: lambda a, b: a - b, 0x21: lambda a, b: a | b,
           0x22: lambda a, b: a + b, 0x24: lambda a, b: a << b, 0x25: lambda a, b: a >> b,
           0x1E: lambda a, b: a * b, 0x27: lambda a, b: a ^ b,
           0x29: lambda a, b: int(a == b), 0x2A: lambda a, b: int(a >= b), 0x2B: lambda a, b: int(a > b),
           0x2C: lambda a, b: int(a <= b), 0x2D: lambda a, b: int(a < b), 0x2E: lambda a, b: int(a != b)}
_MASK64 = (1 << 64) - 1


def evaluate_expression(expr: bytes, register, read_u64=None) -> int | None:
    """The value of DWARF expression EXPR, REGISTER(n) giving register n's value (None if
    unknown) and READ_U64(address) memory (DW_OP_deref). None for an operation this evaluator
    does not know, an unknown register or a malformed expression: the unwind stops there."""
    stack: list[int] = []
    p, n = 0, len(expr)
    try:
        while p < n:
            op = expr[p]
            p += 1
            if _OP_LIT0 <= op <= _OP_LIT31:
                stack.append(op - _OP_LIT0)
            elif _OP_BREG0 <= op <= _OP_BREG31:
                value = register(op - _OP_BREG0)
                if value is None:
                    return None
                offset, p = _leb(expr, p, n, signed=True)
                stack.append((value + offset) & _MASK64)
            elif op in (_OP_CONST1U, _OP_CONST1S, _OP_CONST2U, _OP_CONST2S, _OP_CONST4U, _OP_CONST4S, _OP_CONST8U):
                size = {0x08: 1, 0x09: 1, 0x0A: 2, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}[op]
                stack.append(int.from_bytes(expr[p:p + size], "little", signed=bool(op & 1) and op != 0x0E))
                p += size
            elif op == _OP_CONSTU or op == _OP_PLUS_UCONST:
                value, p = _leb(expr, p, n, signed=False)
                if op == _OP_CONSTU:
                    stack.append(value)
                else:
                    stack.append((stack.pop() + value) & _MASK64)
            elif op == _OP_CONSTS:
                value, p = _leb(expr, p, n, signed=True)
                stack.append(value)
            elif op == _OP_DEREF and read_u64 is not None:
                stack.append(read_u64(stack.pop()))
            elif op in _BINARY:
                b, a = stack.pop(), stack.pop()
                stack.append(_BINARY[op](a, b) & _MASK64)
            else:
                return None
    except (IndexError, ElfError, TypeError):
        return None
    return stack[-1] if stack else None


@dataclass
class CfiTable:
    """A module's FDEs, sorted by start; ``row_at`` gives the CFA row of a link-time pc."""

    fdes: list[_Fde]
    error: str | None = None
    _starts: list[int] = field(default_factory=list, repr=False)
    _rows: dict[int, Row | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._starts = [f.start for f in self.fdes]

    def fde_for(self, pc: int) -> _Fde | None:
        i = bisect.bisect_right(self._starts, pc) - 1
        if i >= 0 and pc < self.fdes[i].end:
            return self.fdes[i]
        return None

    def row_at(self, pc: int) -> Row | None:
        """The CFA row in force at link-time PC; None when no FDE covers it or its
        instructions are corrupt."""
        if pc in self._rows:
            return self._rows[pc]
        row = None
        fde = self.fde_for(pc)
        if fde is not None:
            try:
                row = self._compute(fde, pc)
            except ElfError:
                row = None
        if len(self._rows) > 65536:
            self._rows.clear()  # bounded: a long trace over many pcs must not grow without end
        self._rows[pc] = row
        return row

    @staticmethod
    def _compute(fde: _Fde, pc: int) -> Row:
        state = _State()
        _execute(fde.cie.initial, fde.cie, state, None, fde.start, pc)
        initial = dict(state.rules)
        _execute(fde.instructions, fde.cie, state, initial, fde.start, pc)
        return Row(state.cfa_register, state.cfa_offset, state.rules, fde.cie.return_register,
                   state.cfa_expression, fde.cie.signal_frame)


_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _debug_frame_bytes(path: str) -> bytes:
    """The .debug_frame of the ELF file at PATH (b"" without one)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        read = bounded_reader(fd, os.fstat(fd).st_size, path)
        _e_type, _programs, sections, shstrndx = read_headers(fd, read, path)
        if not 0 < shstrndx < len(sections):
            return b""
        names = section_data(read, sections[shstrndx], "the section name table")
        for sh in sections:
            if names[sh[0]:names.find(b"\0", sh[0])] == b".debug_frame":
                return section_data(read, sh, ".debug_frame")
    return b""


def cfi_of(elf) -> CfiTable:
    """The CFI table of ElfFile ELF, parsed on first use and kept as long as ELF lives:
    .eh_frame's FDEs, and those of .debug_frame (the file's, else its debug file's) for
    code .eh_frame does not cover."""
    table = _tables.get(elf)
    if table is None:
        fdes: list[_Fde] = []
        errors = []
        data, vaddr, data_base = elf.eh_frame_bytes()
        if data is not None:
            fdes, error = parse_cfi(data, vaddr, data_base)
            errors += [error] if error else []
        for path in dict.fromkeys(p for p in (elf.path, elf.debug_file) if p):
            try:
                debug = _debug_frame_bytes(path)
            except (OSError, ElfError) as e:
                errors.append(str(e))
                continue
            if debug and elf.segments:  # a relocatable file's addresses are not relocated
                extra, error = parse_cfi(debug, 0, debug_frame=True)
                errors += [error] if error else []
                covered = CfiTable(fdes)
                fdes = fdes + [f for f in extra if covered.fde_for(f.start) is None]
                break
        fdes.sort(key=lambda f: f.start)
        table = CfiTable(fdes, f"{elf.path}: {'; '.join(errors)}" if errors else None)
        _tables[elf] = table
    return table
