"""Perform an instruction's effect in the tracer instead of running a copy.

An emulated probe costs one ptrace stop and no slot. Only what is no more
work than a boosted copy is emulated (a relative jmp or jcc, a nop: RIP alone),
plus ``call rel32``, the one instruction a copy cannot run (it would push a
return address inside the slot); ``push reg`` and ``ret`` run boosted (see
classify.py). ``apply`` runs on every hit, inside a budget of about a
microsecond, so everything that can be known from the instruction (targets,
the return address bytes, the condition test) is worked out once in
compile_emulation(); ``apply`` only does the arithmetic.
"""
from __future__ import annotations

from typing import Any, Callable

from iced_x86 import ConditionCode

from .classify import (
    CALL_REL_CODES,
    JCC_CODES,
    JMP_REL_CODES,
    NOP_CODES,
    Kind,
    classify,
)
from .decode import Insn

__all__ = [
    "CallRel",
    "Emulation",
    "Jcc",
    "JccSigned",
    "JmpRel",
    "Nop",
    "compile_emulation",
    "condition_test",
]

MASK64 = (1 << 64) - 1

# RFLAGS bits the condition codes read.
CF = 1 << 0
PF = 1 << 2
ZF = 1 << 6
SF = 1 << 7
OF = 1 << 11


# Each condition as (mask, negate, signed): taken when (flags & mask) != 0,
# inverted when negate. The four signed conditions compare SF with OF; they
# first fold SF^OF into bit 7 (OF is bit 11, so flags ^ (flags >> 4) puts
# OF^SF at bit 7) and keep ZF at bit 6, so every condition is one mask test.
# That keeps a hit to a couple of integer operations and no extra call.
_CONDITIONS: dict[int, tuple[int, bool, bool]] = {
    ConditionCode.O: (OF, False, False),
    ConditionCode.NO: (OF, True, False),
    ConditionCode.B: (CF, False, False),
    ConditionCode.AE: (CF, True, False),
    ConditionCode.E: (ZF, False, False),
    ConditionCode.NE: (ZF, True, False),
    ConditionCode.BE: (CF | ZF, False, False),
    ConditionCode.A: (CF | ZF, True, False),
    ConditionCode.S: (SF, False, False),
    ConditionCode.NS: (SF, True, False),
    ConditionCode.P: (PF, False, False),
    ConditionCode.NP: (PF, True, False),
    ConditionCode.L: (0x80, False, True),
    ConditionCode.GE: (0x80, True, True),
    ConditionCode.LE: (0x80 | ZF, False, True),
    ConditionCode.G: (0x80 | ZF, True, True),
}


def _fold_signed(flags: int) -> int:
    return ((flags ^ (flags >> 4)) & 0x80) | (flags & ZF)


def condition_test(condition: int) -> Callable[[int], bool]:
    """The function deciding, from RFLAGS, whether a jcc with CONDITION is taken."""
    mask, negate, signed = _CONDITIONS[condition]
    if signed:
        return lambda flags: ((_fold_signed(flags) & mask) == 0) == negate
    return lambda flags: ((flags & mask) == 0) == negate


class Emulation:
    """The effect of one instruction on registers and memory.

    ``regs`` has integer attributes rip, rsp, eflags and the 16 GPRs (a ctypes
    user_regs_struct in practice); ``memory`` has ``read(address, size)`` and
    ``write(address, data)``. ``needs_memory`` tells the caller whether it
    must supply a working ``memory``.
    """

    __slots__ = ()
    needs_memory: bool = False
    # Set when the whole effect is "RIP = this address" (a nop, a jmp): the hit path then makes
    # it one register write, as it does for a boost.
    constant_rip: int | None = None

    def apply(self, regs: Any, memory: Any) -> None:
        raise NotImplementedError


class Nop(Emulation):
    __slots__ = ("next", "constant_rip")

    def __init__(self, next_address: int) -> None:
        self.next = self.constant_rip = next_address

    def apply(self, regs: Any, memory: Any) -> None:
        regs.rip = self.next

    def __repr__(self) -> str:
        return f"Nop(next={self.next:#x})"


class JmpRel(Emulation):
    __slots__ = ("target", "constant_rip")

    def __init__(self, target: int) -> None:
        self.target = self.constant_rip = target

    def apply(self, regs: Any, memory: Any) -> None:
        regs.rip = self.target

    def __repr__(self) -> str:
        return f"JmpRel(target={self.target:#x})"


class Jcc(Emulation):
    """A conditional jump on CF/PF/ZF/SF/OF alone."""

    __slots__ = ("target", "next", "condition", "mask", "negate")

    def __init__(self, condition: int, target: int, next_address: int) -> None:
        self.condition = condition
        self.mask, self.negate, _ = _CONDITIONS[condition]
        self.target = target
        self.next = next_address

    def taken(self, flags: int) -> bool:
        return ((flags & self.mask) == 0) == self.negate

    def apply(self, regs: Any, memory: Any) -> None:
        # taken <=> (flags & mask) != 0, inverted by negate
        regs.rip = self.target if ((regs.eflags & self.mask) == 0) == self.negate else self.next

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(condition={self.condition}, target={self.target:#x}, "
                f"next={self.next:#x})")


class JccSigned(Jcc):
    """jl/jge/jle/jg: SF != OF (and ZF), folded into one mask test."""

    __slots__ = ()

    def taken(self, flags: int) -> bool:
        return ((_fold_signed(flags) & self.mask) == 0) == self.negate

    def apply(self, regs: Any, memory: Any) -> None:
        f = regs.eflags
        f = ((f ^ (f >> 4)) & 0x80) | (f & ZF)
        regs.rip = self.target if ((f & self.mask) == 0) == self.negate else self.next


class CallRel(Emulation):
    __slots__ = ("target", "return_address", "_return_bytes")
    needs_memory = True

    def __init__(self, target: int, return_address: int) -> None:
        self.target = target
        self.return_address = return_address
        self._return_bytes = return_address.to_bytes(8, "little")

    def apply(self, regs: Any, memory: Any) -> None:
        rsp = (regs.rsp - 8) & MASK64
        # Memory first: if the stack write fails the registers are untouched
        # and the caller can report the hit without corrupting the thread.
        memory.write(rsp, self._return_bytes)
        regs.rsp = rsp
        regs.rip = self.target

    def __repr__(self) -> str:
        return f"CallRel(target={self.target:#x}, return_address={self.return_address:#x})"


def compile_emulation(insn: Insn) -> Emulation:
    """Precompute the emulation of an instruction classify() marks EMULATE.

    Raises ValueError for any other instruction (including an emulatable
    opcode whose prefixes make classify() refuse it).
    """
    verdict = classify(insn)
    if verdict.kind is not Kind.EMULATE:
        raise ValueError(f"{insn.address:#x}: '{insn.text}' is not emulated ({verdict.kind.value}: "
                         f"{verdict.reason})")
    i = insn.instruction
    code = i.code
    next_address = (insn.address + insn.length) & MASK64
    if code in NOP_CODES:
        return Nop(next_address)
    if code in JMP_REL_CODES:
        return JmpRel(i.near_branch_target)
    if code in JCC_CODES:
        signed = _CONDITIONS[i.condition_code][2]
        return (JccSigned if signed else Jcc)(i.condition_code, i.near_branch_target, next_address)
    if code in CALL_REL_CODES:
        return CallRel(i.near_branch_target, next_address)
    raise ValueError(f"{insn.address:#x}: no emulation for '{insn.text}'")  # sets out of sync
