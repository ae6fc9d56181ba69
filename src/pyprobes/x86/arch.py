"""The architecture side of a probe hit: what the generic engine asks of x86-64.

The engine (engine/engine.py) is generic, as the kernel's kernel/kprobes.c is; this module
plays arch/x86/kernel/kprobes/core.c. The engine names no register and no opcode: it asks

  prepare_slot(insn, slot_address, boosted) -> SlotCopy
      the bytes a slot holds for INSN (arch_prepare_kprobe: the relocated copy and, when
      boostable, the jmp back) and what a single-step of them leaves to put right;
  SlotCopy.resume_after_step(thread, memory, tid, pc) -> pc
      after one single-step of the copy: the program counter, a return address a call
      pushed and the trap flag a pushf pushed, put back in original terms (resume_singlestep);
  SlotCopy.original_address(pc) -> pc
      where a thread found at PC inside the slot continues in original code, if known;
  instruction_pointer / set_instruction_pointer / stack_pointer / return_value
      the registers of a `Regs` by role, not by name (instruction_pointer(regs) and
      regs_return_value in the kernel);
  MAX_INSTRUCTION_LENGTH
      how many bytes past an address to read to decode the instruction there;
  DWARF_REGISTERS, DWARF_STACK_POINTER, DWARF_RETURN_ADDRESS
      the registers of a `Regs` by their DWARF number (call frame information, unwinding);
  return_address_slot / popped_return_slot, BREAKPOINT, BREAKPOINT_LENGTH
      what return probes need to hijack a return and to know it came back
      (arch_prepare_kretprobe, the kretprobe trampoline).

Emulation (emulate.py) and classification (classify.py) are the other half of the
interface; this module only gathers what a hit does with a slot and a stack.
"""
from __future__ import annotations

from typing import Any, Protocol

from .decode import Insn
from .relocate import RelocationError, SlotCode, pushed_flags_fixup, relocate, return_address_fixup
from .rescue import with_jmp_back

__all__ = [
    "DWARF_REGISTERS",
    "DWARF_RETURN_ADDRESS",
    "DWARF_STACK_POINTER",
    "BREAKPOINT",
    "BREAKPOINT_LENGTH",
    "ENTRY_CFA_OFFSET",
    "INTEGER_ARGUMENT_REGISTERS",
    "SSE_ARGUMENT_REGISTERS",
    "MAX_INSTRUCTION_LENGTH",
    "SlotCopy",
    "STACK_POINTER",
    "StackMemory",
    "ThreadRegisters",
    "instruction_pointer",
    "popped_return_slot",
    "prepare_slot",
    "return_address_slot",
    "return_value",
    "set_instruction_pointer",
    "stack_pointer",
    "vector_register_index",
]

MAX_INSTRUCTION_LENGTH = 15
# 16 in DWARF_REGISTERS (below) is the return address column, the caller's rip.
DWARF_STACK_POINTER = 7
DWARF_RETURN_ADDRESS = 16
BREAKPOINT = b"\xcc"  # int3
BREAKPOINT_LENGTH = len(BREAKPOINT)  # a trap on it reports the program counter this far past it
RETURN_ADDRESS_SIZE = 8
_TRAP_FLAG = 0x100  # RFLAGS.TF
# The x86-64 psABI's DWARF register numbers (3.6.2), as Regs field names; xmmN are not in Regs.
DWARF_REGISTERS = {0: "rax", 1: "rdx", 2: "rcx", 3: "rbx", 4: "rsi", 5: "rdi", 6: "rbp", 7: "rsp",
                   **{n: f"r{n}" for n in range(8, 16)}, 16: "rip", **{17 + n: f"xmm{n}" for n in range(16)}}
STACK_POINTER = "rsp"
# SysV psABI 3.2.3: INTEGER-class arguments in these, in order; SSE-class ones in xmm0..7.
INTEGER_ARGUMENT_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
SSE_ARGUMENT_REGISTERS = tuple(f"xmm{n}" for n in range(8))
ENTRY_CFA_OFFSET = 8  # at a function's first instruction the CFA is rsp + 8 (just above the return address)


class ThreadRegisters(Protocol):
    """Single-register access to a stopped thread (pyprobes.tracee.Tracee provides it)."""

    def get_reg(self, tid: int, name: str) -> int: ...

    def set_rip(self, tid: int, rip: int) -> None: ...


class StackMemory(Protocol):
    """The traced process's memory (pyprobes.tracee.Memory provides it)."""

    def read(self, address: int, size: int) -> bytes: ...

    def write(self, address: int, data: bytes) -> None: ...

    def read_u64(self, address: int) -> int: ...

    def write_u64(self, address: int, value: int) -> None: ...


class SlotCopy:
    """One probed instruction's copy in a slot: its bytes, and what a step of it needs fixed."""

    __slots__ = ("insn", "slot_address", "code", "call_fix", "pushf_width", "_exits")

    def __init__(self, insn: Insn, slot_address: int, code: SlotCode) -> None:
        self.insn = insn
        self.slot_address = slot_address
        self.code = code
        # A stepped call pushes its return address inside the slot: (that one, the right one).
        self.call_fix = return_address_fixup(insn, slot_address, code)
        # A stepped pushf stores RFLAGS with TF set: this many bytes at [rsp] to clear it in.
        self.pushf_width = pushed_flags_fixup(insn)
        # step_fixup() as one lookup for the hit path: each place a step can stop in the slot,
        # and the original address it stands for.
        exits = {slot_address + offset: original for offset, original in code.exits}
        exits.setdefault(slot_address + code.copy_length, code.resume_address)
        self._exits = exits

    @property
    def bytes(self) -> bytes:
        """What to write at slot_address."""
        return self.code.code

    def original_address(self, pc: int) -> int:
        """Where a thread at PC in this slot continues in original code; PC itself when that is
        not known (the copy has not run, or PC is already outside the slot): step_fixup()."""
        return self._exits.get(pc, pc)

    def resume_after_step(self, thread: ThreadRegisters, memory: StackMemory, tid: int, pc: int) -> int:
        """Once the copy has run under a single-step, with the thread at PC: put the program
        counter and anything the copy pushed back in original terms; return the new PC."""
        if self.call_fix is not None:
            wrong, right = self.call_fix
            rsp = thread.get_reg(tid, "rsp")
            if memory.read_u64(rsp) == wrong:
                memory.write_u64(rsp, right)
        if self.pushf_width:
            width = self.pushf_width
            rsp = thread.get_reg(tid, "rsp")
            image = int.from_bytes(memory.read(rsp, width), "little") & ~_TRAP_FLAG
            memory.write(rsp, image.to_bytes(width, "little"))
        new = self._exits.get(pc, pc)
        if new != pc:
            thread.set_rip(tid, new)
        return new

    def __repr__(self) -> str:
        return f"<SlotCopy {self.insn.text!r} at slot {self.slot_address:#x}>"


def prepare_slot(insn: Insn, slot_address: int, boosted: bool, jmp_back: bool = False) -> SlotCopy:
    """The copy of INSN for the slot at SLOT_ADDRESS; RelocationError if it cannot run there.

    A boostable copy carries its jmp back from the start: stepping stops before it, and
    boosting it later then needs no rewrite of a slot a thread may be in. JMP_BACK: a copy that
    must always be stepped carries one too, which only a dead tracer's threads ever run (rescue.py)."""
    code = relocate(insn, slot_address, boosted=boosted)
    if jmp_back and not boosted:
        try:
            code = with_jmp_back(insn, slot_address, code)
        except RelocationError:
            pass  # stepped as ever; only the rescue after the tracer's death loses this point
    return SlotCopy(insn, slot_address, code)


def instruction_pointer(regs: Any) -> int:
    return regs.rip


def set_instruction_pointer(regs: Any, value: int) -> None:
    regs.rip = value


def stack_pointer(regs: Any) -> int:
    return regs.rsp


def return_value(regs: Any) -> int:
    """The integer a function returned (SysV ABI: rax), read at its return."""
    return regs.rax


def return_address_slot(regs: Any) -> int:
    """At a function's first instruction: where its return address is on the stack."""
    return regs.rsp


def popped_return_slot(regs: Any) -> int:
    """Just after a `ret`: where the return address it popped was."""
    return regs.rsp - RETURN_ADDRESS_SIZE


def vector_register_index(name: str) -> int | None:
    """N for "xmmN" (read from the FP registers, not Regs); None for a general register."""
    return int(name[3:]) if name.startswith("xmm") else None
