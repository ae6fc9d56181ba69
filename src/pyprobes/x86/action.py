"""The building blocks of a trampoline's action (optimize.py, record.py): stepping over the red
zone, saving the flags, encoding with a reach check.

The flags are saved as DynamoRIO and Pin save them (``push rax; seto al; lahf`` ...
``add al,0x7f; sahf; pop rax``), not with pushfq/popfq: popfq is microcoded (a C copy of the
count trampoline on this VM: pushfq, lock inc, popfq 28.7 ns a hit; the lahf sequence around
the lock inc 10.4 ns; the bare lock inc 10.8 ns). DF, IF and TF are untouched by
every instruction of it, so none needs saving; and as nothing loads a flags image
from the stack, a thread single-stepped through any instruction of the action carries no
stale TF out of it (the popfq pitfall in Trampoline.finish_action does not arise).

lahf and sahf exist in 64-bit mode on every x86-64 CPU but the first (Athlon 64 before
revision D, Pentium 4 and Xeon before 2005: CPUID "LAHF-SAHF", /proc/cpuinfo "lahf_lm"); where
a CPU lacks them, no action is placed (flags_saved_by_lahf).
"""
from __future__ import annotations

from functools import cache

from iced_x86 import Code, Encoder, Instruction, MemoryOperand, Register

from .relocate import RelocationError

__all__ = ["RED_ZONE", "encode", "encode_action", "flags_restore", "flags_save", "flags_saved_by_lahf", "red_zone_step",
           "rel32"]

RED_ZONE = 128  # bytes below RSP that the System V ABI lets leaf code use without moving RSP
_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1


@cache
def flags_saved_by_lahf() -> bool:
    """Whether this machine's CPU runs lahf/sahf in 64-bit mode (what flags_save() needs)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "lahf_lm" in line.split()
    except OSError:
        pass
    return True  # no /proc: assume the rule, not the first CPUs' exception


def rel32(source_next: int, target: int) -> int | None:
    delta = target - source_next
    return delta if _INT32_MIN <= delta <= _INT32_MAX else None


def encode(instruction: Instruction, address: int) -> bytes:
    encoder = Encoder(64)
    encoder.encode(instruction, address)
    return encoder.take_buffer()


def red_zone_step(down: bool) -> Instruction:
    """``lea rsp,[rsp-128]`` (DOWN) or ``lea rsp,[rsp+128]``: over the red zone, flags untouched."""
    return Instruction.create_reg_mem(Code.LEA_R64_M, Register.RSP,
                                      MemoryOperand(Register.RSP, displ=-RED_ZONE if down else RED_ZONE))


def flags_save() -> list[Instruction]:
    """Save the flags an arithmetic instruction changes in rax (which this pushes): OF in al
    (seto), SF ZF AF PF CF in ah (lahf). flags_restore() undoes it."""
    return [Instruction.create_reg(Code.PUSH_R64, Register.RAX),
            Instruction.create_reg(Code.SETO_RM8, Register.AL),
            Instruction.create(Code.LAHF)]


def flags_restore() -> list[Instruction]:
    """The flags saved by flags_save() back, and rax: ``add al,0x7f`` sets OF exactly when al
    is 1, then sahf loads ah."""
    return [Instruction.create_reg_i32(Code.ADD_RM8_IMM8, Register.AL, 0x7F),
            Instruction.create(Code.SAHF),
            Instruction.create_reg(Code.POP_R64, Register.RAX)]


def encode_action(items: list[Instruction], address: int, reach: dict[int, int]) -> bytes:
    """ITEMS encoded one after another at ADDRESS. REACH maps the index of an item with a
    RIP-relative operand to its target, checked within ±2 GiB here rather than left to the
    encoder, whose error would not say what to do."""
    code = b""
    for i, item in enumerate(items):
        here = address + len(code)
        target = reach.get(i)
        if target is not None:
            item.memory_displacement = here  # in reach: for the instruction's length
            length = len(encode(item, here))
            item.memory_displacement = target
            if rel32(here + length, target) is None:
                raise RelocationError(f"{target:#x} is beyond ±2 GiB of trampoline {address:#x}: "
                                      "place the counter page near the trampoline")
        code += encode(item, here)
    return code
