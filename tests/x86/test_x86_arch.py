"""x86/arch.py: what the generic engine asks of x86 about a hit, tested without a process.

resume_after_step gets a thread's registers and memory through two small Protocols; here they
are plain dictionaries, as slots' tests use a FakeHost for the slot cache's SlotHost.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pyprobes.x86 import (BREAKPOINT, BREAKPOINT_LENGTH, RelocationError, SlotCopy, decode_function,
                          instruction_pointer, popped_return_slot, prepare_slot, relocate, return_address_slot,
                          return_value, set_instruction_pointer, stack_pointer, step_fixup)

ORIG = 0x7F12_3400_1000
SLOT = 0x7F12_3456_7000
STACK = 0x7FFF_0000_1000
TID = 1234


def one(hexcode: str, address: int = ORIG):
    (insn,) = decode_function(bytes.fromhex(hexcode), address)
    return insn


class Thread:
    """A stopped thread's registers (ThreadRegisters)."""

    def __init__(self, **regs: int) -> None:
        self.regs = dict(regs)
        self.rip_writes: list[int] = []

    def get_reg(self, tid: int, name: str) -> int:
        assert tid == TID
        return self.regs[name]

    def set_rip(self, tid: int, rip: int) -> None:
        assert tid == TID
        self.regs["rip"] = rip
        self.rip_writes.append(rip)


class Memory:
    """Bytes at addresses (StackMemory)."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}

    def read(self, address: int, size: int) -> bytes:
        return bytes(self.bytes[address + i] for i in range(size))

    def write(self, address: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bytes[address + i] = b

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, value.to_bytes(8, "little"))


def test_prepare_slot_holds_the_relocated_copy():
    insn = one("488d0500100000")  # lea rax,[rip+0x1000]
    for boosted in (False, True):
        copy = prepare_slot(insn, SLOT, boosted=boosted)
        assert isinstance(copy, SlotCopy)
        assert copy.bytes == relocate(insn, SLOT, boosted=boosted).code
        assert copy.slot_address == SLOT and copy.insn is insn
        assert copy.call_fix is None and copy.pushf_width == 0


def test_prepare_slot_refuses_a_boosted_call():
    with pytest.raises(RelocationError):
        prepare_slot(one("e800000000"), SLOT, boosted=True)


def test_plain_copy_step_moves_the_program_counter_back():
    insn = one("4883c001")  # add rax,1
    copy = prepare_slot(insn, SLOT, boosted=False)
    thread, memory = Thread(rsp=STACK), Memory()
    assert copy.resume_after_step(thread, memory, TID, SLOT + 4) == ORIG + 4
    assert thread.rip_writes == [ORIG + 4]
    assert memory.bytes == {}  # nothing pushed, nothing touched


def test_stepped_call_gets_its_original_return_address():
    insn = one("e8fb0f0000")  # call ORIG+0x1000
    copy = prepare_slot(insn, SLOT, boosted=False)
    pushed, right = copy.call_fix
    assert right == ORIG + 5 and pushed == SLOT + copy.code.copy_length
    thread, memory = Thread(rsp=STACK), Memory()
    memory.write_u64(STACK, pushed)
    target = ORIG + 0x1000
    assert copy.resume_after_step(thread, memory, TID, target) == target
    assert memory.read_u64(STACK) == right
    assert thread.rip_writes == []  # a taken call is already at its absolute target


def test_call_fix_leaves_a_stack_that_does_not_hold_the_slot_address():
    copy = prepare_slot(one("e8fb0f0000"), SLOT, boosted=False)
    thread, memory = Thread(rsp=STACK), Memory()
    memory.write_u64(STACK, 0x1234)
    copy.resume_after_step(thread, memory, TID, ORIG + 0x1000)
    assert memory.read_u64(STACK) == 0x1234


@pytest.mark.parametrize("hexcode, width", [("9c", 8), ("669c", 2)])
def test_stepped_pushf_loses_the_trap_flag(hexcode, width):
    insn = one(hexcode)
    copy = prepare_slot(insn, SLOT, boosted=False)
    assert copy.pushf_width == width
    thread, memory = Thread(rsp=STACK), Memory()
    flags = 0x246 | 0x100  # ZF PF IF, and TF from the single-step
    memory.write(STACK, flags.to_bytes(width, "little"))
    memory.write(STACK + width, b"\xaa")  # the byte above the image stays as it was
    assert copy.resume_after_step(thread, memory, TID, SLOT + insn.length) == ORIG + insn.length
    assert int.from_bytes(memory.read(STACK, width), "little") == 0x246
    assert memory.read(STACK + width, 1) == b"\xaa"


def test_original_address_of_a_thread_in_the_slot():
    insn = one("4883c001")
    copy = prepare_slot(insn, SLOT, boosted=True)
    assert copy.original_address(SLOT + 4) == ORIG + 4  # at the jmp back
    assert copy.original_address(SLOT) == SLOT          # the copy has not run: unknown


def test_registers_by_role():
    regs = SimpleNamespace(rip=1, rsp=STACK, rax=42)
    assert instruction_pointer(regs) == 1
    set_instruction_pointer(regs, 7)
    assert regs.rip == 7
    assert stack_pointer(regs) == STACK
    assert return_value(regs) == 42
    assert return_address_slot(regs) == STACK
    assert popped_return_slot(regs) == STACK - 8


def test_breakpoint_is_int3():
    assert BREAKPOINT == b"\xcc" and BREAKPOINT_LENGTH == 1


@pytest.mark.parametrize("hexcode", ["4883c001", "488d0500100000", "e2fe", "e3f0", "7405", "ebfe", "e8fb0f0000", "c3"])
@pytest.mark.parametrize("boosted", [False, True])
def test_original_address_is_step_fixup(hexcode, boosted):
    insn = one(hexcode)
    try:
        copy = prepare_slot(insn, SLOT, boosted=boosted)
    except RelocationError:
        return  # a boosted call: refused, as test_prepare_slot_refuses_a_boosted_call checks
    for pc in [SLOT + i for i in range(-1, 40)] + [ORIG, ORIG + insn.length, ORIG + 0x1000]:
        assert copy.original_address(pc) == step_fixup(insn, copy.code, SLOT, pc)
