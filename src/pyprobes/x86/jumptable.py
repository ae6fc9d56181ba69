"""Switch jump tables: the targets of an indirect ``jmp`` that is recognisably gcc's dispatch.

An indirect jmp refuses every region of its function (optimize.py): a target nobody sees could
be the patched bytes. Most of them are switch dispatches whose every target can be read. Two
shapes are recognised, from the decoded instructions only:

    cmp $N, %eax            ; the bound, compared unsigned
    ja default
    lea T(%rip), %rdx       ; -fPIC: N+1 int32 entries, each relative to T
    mov %eax, %eax          ; (zero-extension or copies, in any order, other code between)
    movslq (%rdx,%rax,4), %rax
    add %rdx, %rax
    jmp *%rax               ; (notrack)

    cmp $N, %eax; ja default; jmp *T(,%rax,8)   ; -fno-pic: N+1 absolute 8-byte entries

The bound must dominate the jmp: the ``ja`` directly follows the ``cmp``, every instruction
from the ``ja`` to the ``jmp`` falls through, and no known branch target (a direct branch, an
entry of a table) lies after the ``cmp`` up to the ``jmp`` - so every path to the jmp went
through the check. The index register is followed through register copies; any other write to
a register the pattern needs ends the match. An index compared as 32 bits is taken as
zero-extended, as gcc does (it writes the register as 32 bits before). Anything else - a
computed goto (``goto *labels[i]``), a tail call through a pointer, a table of unknown length -
is not recognised, and its function stays refused. Not seen either: a jump into the middle of
a dispatch sequence from another function (gcc's NAME.cold parts jump back to labels, never
past a dispatch's bound check).
"""
from __future__ import annotations

import struct
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable, Collection

from iced_x86 import (Code, Decoder, FlowControl, Instruction, InstructionInfoFactory, OpAccess, OpKind,
                      Register, RegisterExt)

__all__ = ["ReadData", "Switch", "reached_addresses", "switch_at", "switches"]

ReadData = Callable[[int, int], bytes]
"""read_data(address, size): SIZE bytes of the module at ADDRESS (its read-only data)."""

MAX_ENTRIES = 4096  # a larger bound is no switch gcc emits a table for: refuse
_WINDOW = 24        # instructions looked at before the jmp
_MAX_INSTRUCTION = 15
_CMPS = frozenset({Code.CMP_RM32_IMM8, Code.CMP_RM32_IMM32, Code.CMP_RM64_IMM8, Code.CMP_RM64_IMM32})
_JA = frozenset({Code.JA_REL8_64, Code.JA_REL32_64})
_MOVES = frozenset({Code.MOV_R32_RM32, Code.MOV_RM32_R32, Code.MOV_R64_RM64, Code.MOV_RM64_R64})
_WRITES = frozenset({OpAccess.WRITE, OpAccess.READ_WRITE, OpAccess.COND_WRITE, OpAccess.READ_COND_WRITE})
_NEAR_BRANCHES = frozenset({OpKind.NEAR_BRANCH16, OpKind.NEAR_BRANCH32, OpKind.NEAR_BRANCH64})
_ADDS = frozenset({Code.ADD_R64_RM64, Code.ADD_RM64_R64})
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Switch:
    """A recognised dispatch: the ``cmp`` that bounds it, its ``jmp``, its table and targets."""

    check: int     # the cmp's address: from after it to the jmp, nothing may branch in
    jump: int
    table: int
    targets: tuple[int, ...]  # one per entry, in table order


def _full(register: Register) -> Register:
    return RegisterExt.full_register(register)


def _register_operands(insn: Instruction) -> bool:
    return insn.op_count == 2 and insn.op0_kind == OpKind.REGISTER and insn.op1_kind == OpKind.REGISTER


class _Dataflow:
    """What the registers hold between the bound check and the jmp."""

    def __init__(self, index: Register) -> None:
        self.bounded = {index}                     # registers holding the index, 0..N
        self.base: dict[Register, int] = {}        # register -> T (lea T(%rip))
        self.loaded: dict[Register, int] = {}      # register -> an int32 entry of T, sign-extended
        self.target: dict[Register, int] = {}      # register -> T + an entry of T (PIC)
        self.absolute: dict[Register, int] = {}    # register -> a qword entry of T (non-PIC)
        self._info = InstructionInfoFactory()

    def _kill(self, register: Register) -> None:
        for known in (self.bounded, self.base, self.loaded, self.target, self.absolute):
            if isinstance(known, set):
                known.discard(register)
            else:
                known.pop(register, None)

    def _scaled_index(self, insn: Instruction, scale: int) -> bool:
        return (insn.memory_index_scale == scale and _full(insn.memory_index) in self.bounded)

    def step(self, insn: Instruction) -> None:
        code = insn.code
        new: tuple[dict | set, Register, int | None] | None = None
        if code == Code.LEA_R64_M and insn.memory_base == Register.RIP:
            new = (self.base, insn.op0_register, insn.ip_rel_memory_address)
        elif code in _MOVES and _register_operands(insn) and _full(insn.op1_register) in self.bounded:
            new = (self.bounded, _full(insn.op0_register), None)
        elif (code == Code.MOVSXD_R64_RM32 and insn.op1_kind == OpKind.MEMORY
              and insn.memory_base in self.base and insn.memory_displacement == 0
              and self._scaled_index(insn, 4)):
            new = (self.loaded, insn.op0_register, self.base[insn.memory_base])
        elif code in _ADDS and _register_operands(insn):
            dst, src = insn.op0_register, insn.op1_register
            if self.loaded.get(dst) is not None and self.loaded[dst] == self.base.get(src):
                new = (self.target, dst, self.loaded[dst])
            elif self.loaded.get(src) is not None and self.loaded[src] == self.base.get(dst):
                new = (self.target, dst, self.loaded[src])
        elif (code == Code.MOV_R64_RM64 and insn.op1_kind == OpKind.MEMORY
              and insn.memory_base == Register.NONE and self._scaled_index(insn, 8)):
            new = (self.absolute, insn.op0_register, insn.memory_displacement & _MASK64)
        for used in self._info.info(insn).used_registers():
            if used.access in _WRITES:
                self._kill(_full(used.register))
        if new is not None:
            known, register, value = new
            if isinstance(known, set):
                known.add(register)
            else:
                known[register] = value

    def table_of(self, jump: Instruction) -> tuple[int, bool] | None:
        """(T, PIC or not) for the dispatch JUMP, or None."""
        if jump.op0_kind == OpKind.REGISTER:
            register = jump.op0_register
            if register in self.target:
                return self.target[register], True
            if register in self.absolute:
                return self.absolute[register], False
            return None
        if jump.memory_base == Register.NONE and self._scaled_index(jump, 8):
            return jump.memory_displacement & _MASK64, False
        return None


def switch_at(code: bytes, address: int, boundaries: list[int], jump_index: int,
              labels: Collection[int], read_data: ReadData) -> Switch | None:
    """The switch dispatched by the indirect jmp at boundaries[JUMP_INDEX] in CODE (a function's
    bytes at ADDRESS), its table read with READ_DATA; None when it is not recognisably one or the
    table cannot be read. LABELS: every address known to be branched to (see the docstring)."""
    first = max(0, jump_index - _WINDOW)
    start = boundaries[first]
    jump_address = boundaries[jump_index]
    window = list(Decoder(64, code[start - address:jump_address - address + _MAX_INSTRUCTION], ip=start))
    window = window[:jump_index - first + 1]
    if not window or window[-1].ip != jump_address:
        return None
    jump = window[-1]
    # the nearest cmp; ja before the jmp with only fall-through code between
    at = len(window) - 2
    while at >= 1 and not (window[at].code in _JA and window[at - 1].code in _CMPS):
        if window[at].flow_control != FlowControl.NEXT:
            return None
        at -= 1
    if at < 1:
        return None
    check = window[at - 1]
    if check.op0_kind != OpKind.REGISTER or not RegisterExt.is_gpr(check.op0_register) \
            or RegisterExt.size(check.op0_register) < 4:
        return None
    width = RegisterExt.size(check.op0_register) * 8
    bound = check.immediate(1) & ((1 << width) - 1)
    if bound >= MAX_ENTRIES:
        return None
    if any(insn.ip in labels for insn in window[at:]):
        return None
    flow = _Dataflow(_full(check.op0_register))
    for insn in window[at + 1:-1]:
        flow.step(insn)
    found = flow.table_of(jump)
    if found is None:
        return None
    table, pic = found
    count = bound + 1
    size = 4 if pic else 8
    try:
        data = read_data(table, count * size)
    except (OSError, ValueError):
        return None
    if len(data) != count * size:
        return None
    if pic:
        targets = tuple((table + entry) & _MASK64 for (entry,) in struct.iter_unpack("<i", data))
    else:
        targets = tuple(entry for (entry,) in struct.iter_unpack("<Q", data))
    return Switch(check.ip, jump_address, table, targets)


def switches(code: bytes, address: int, boundaries: list[int], jumps: list[int],
             direct_targets: Collection[int], read_data: ReadData) -> list[Switch] | int:
    """Every indirect jmp of a function (JUMPS: indices into BOUNDARIES) as a recognised switch,
    or the address of the first that is not one. DIRECT_TARGETS: what the function's direct
    branches reach. A table entry that lands inside a dispatch sequence (after its cmp) makes
    that dispatch unrecognised too: its bound would not dominate its jmp."""
    labels = set(direct_targets)
    found = []
    for index in jumps:
        switch = switch_at(code, address, boundaries, index, labels, read_data)
        if switch is None:
            return boundaries[index]
        found.append(switch)
    targets = sorted({t for s in found for t in s.targets})
    for switch in found:
        at = bisect_right(targets, switch.check)
        if at < len(targets) and targets[at] <= switch.jump:
            return switch.jump
    return found


def reached_addresses(code: bytes, address: int, read_data: ReadData | None = None) -> list[int]:
    """Every address a direct branch or a RIP-relative operand in CODE (a module's executable
    bytes, loaded at ADDRESS, decoded in one linear sweep) takes, and with READ_DATA every entry
    of a recognised switch table, sorted: what a region must not contain past its first byte
    (a table of one function may target another: gcc's NAME.cold). Bytes that are not code
    decode as something: the sweep may see a branch that is not there, which only refuses a
    region, never allows one."""
    found = set()
    decoder = Decoder(64, code, ip=address)
    insn = Instruction()
    add = found.add
    boundaries: list[int] = []
    while decoder.can_decode:
        decoder.decode_out(insn)
        boundaries.append(insn.ip)
        if insn.op0_kind in _NEAR_BRANCHES:
            add(insn.near_branch_target)
        elif insn.is_ip_rel_memory_operand:
            add(insn.ip_rel_memory_address)
        elif read_data is not None and insn.flow_control == FlowControl.INDIRECT_BRANCH:
            # Additive only: no dominance is needed to add targets (labels left empty).
            switch = switch_at(code, address, boundaries, len(boundaries) - 1, (), read_data)
            if switch is not None:
                found.update(switch.targets)
    return sorted(found)
