"""relocate: copies in a slot reach the same absolute targets as the original.

Addresses are real 64-bit ones on purpose: when a target fits in 32 bits iced
quietly switches to absolute addressing, which would hide a wrong re-targeting.
"""
from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from iced_x86 import Code, Decoder, OpKind

from pyprobes.x86.classify import Kind, classify
from pyprobes.x86.decode import decode_function
from pyprobes.x86.relocate import (
    SLOT_SIZE,
    RelocationError,
    SlotCode,
    pushed_flags_fixup,
    relocate,
    return_address_fixup,
    step_fixup,
)

ORIG = 0x7F12_3400_1000
SLOT = 0x7F12_3456_7000
PIE = 0x5555_5555_4000
GIB = 1 << 30


def one(hexcode: str, address: int = ORIG):
    insns = decode_function(bytes.fromhex(hexcode), address)
    assert len(insns) == 1
    return insns[0]


def decode_slot(slot: SlotCode, slot_address: int):
    return list(Decoder(64, slot.code, ip=slot_address))


def memory_target(instruction) -> int:
    assert instruction.is_ip_rel_memory_operand
    # with ip set, iced reports the absolute address of a RIP-relative operand
    return instruction.memory_displacement


RIP_RELATIVE = [
    "488b0500100000",   # mov rax,[rip+0x1000]
    "890500e0ffff",     # mov [rip-0x2000],eax
    "488d0500100000",   # lea rax,[rip+0x1000]
    "c7059a0f000001000000",  # mov dword [rip+0xf9a],1 (immediate after the displacement)
    "0f1005f0ffffff",   # movups xmm0,[rip-0x10]
    "48833d0010000000",  # cmp qword [rip+0x1000],0
]


@pytest.mark.parametrize("hexcode", RIP_RELATIVE)
@pytest.mark.parametrize("slot_address", [ORIG + 3 * GIB // 2, ORIG - 3 * GIB // 2, SLOT])
def test_rip_relative_keeps_its_absolute_target(hexcode, slot_address):
    insn = one(hexcode)
    want = memory_target(insn.instruction)
    slot = relocate(insn, slot_address, boosted=False)
    (copy,) = decode_slot(slot, slot_address)
    assert copy.is_ip_rel_memory_operand         # still RIP-relative, not absolute
    assert memory_target(copy) == want
    assert copy.code == insn.instruction.code
    assert slot.copy_length == len(slot.code) == copy.len
    assert slot.resume_address == insn.address + insn.length


@pytest.mark.parametrize("hexcode", RIP_RELATIVE)
def test_pie_addresses_with_a_nearby_slot(hexcode):
    insn = one(hexcode, PIE)
    for slot_address in (PIE + 0x7000_0000, PIE - 0x7000_0000, PIE + 0x20_0000):
        slot = relocate(insn, slot_address, boosted=True)
        copy, jmp = decode_slot(slot, slot_address)
        assert memory_target(copy) == memory_target(insn.instruction)
        assert jmp.near_branch_target == PIE + insn.length


@pytest.mark.parametrize("hexcode", RIP_RELATIVE + ["4883c001", "488d447f01", "9c", "c9"])
def test_boosted_copy_ends_in_jmp_back(hexcode):
    insn = one(hexcode)
    slot = relocate(insn, SLOT, boosted=True)
    assert len(slot.code) == slot.copy_length + 5 <= SLOT_SIZE
    instructions = decode_slot(slot, SLOT)
    assert len(instructions) == 2
    jmp = instructions[-1]
    assert jmp.code == Code.JMP_REL32_64
    assert jmp.ip == SLOT + slot.copy_length
    assert jmp.near_branch_target == insn.address + insn.length == slot.resume_address


def test_position_independent_code_is_copied_byte_for_byte():
    for hexcode in ("4883c001", "662e8b00", "f0ff00", "f3a4", "64488b042528000000"):
        insn = one(hexcode)
        assert relocate(insn, SLOT, boosted=False).code == insn.raw
        assert relocate(insn, SLOT, boosted=True).code[:insn.length] == insn.raw


def test_stepped_copy_has_no_jmp_back():
    insn = one("4883c001")
    slot = relocate(insn, SLOT, boosted=False)
    assert slot.code == insn.raw and slot.copy_length == 4


@pytest.mark.parametrize("hexcode", ["488b0500100000", "890500e0ffff", "488d0500100000"])
@pytest.mark.parametrize("distance", [3 * GIB, -3 * GIB, 1 << 44])
def test_out_of_range_rip_relative_raises(hexcode, distance):
    insn = one(hexcode)
    with pytest.raises(RelocationError) as info:
        relocate(insn, ORIG + distance, boosted=True)
    message = str(info.value)
    assert "2 GiB" in message and f"{ORIG + distance:#x}" in message
    assert isinstance(info.value, ValueError)


def test_out_of_range_jmp_back_raises():
    insn = one("4883c001")  # no RIP-relative operand, but the jmp back must reach
    with pytest.raises(RelocationError, match="jmp back"):
        relocate(insn, ORIG + 3 * GIB, boosted=True)
    relocate(insn, ORIG + 3 * GIB, boosted=False)  # a stepped copy needs no reach


def test_out_of_range_branch_raises():
    with pytest.raises(RelocationError, match="2 GiB"):
        relocate(one("e2fe"), ORIG + 3 * GIB, boosted=False)


def test_calls_never_run_boosted():
    for hexcode in ("e800000000", "ffd0", "ff15f0ffffff"):
        with pytest.raises(RelocationError, match="never run boosted"):
            relocate(one(hexcode), SLOT, boosted=True)


def test_invalid_bytes_raise():
    with pytest.raises(RelocationError):
        relocate(one("06"), SLOT, boosted=False)


@pytest.mark.parametrize("hexcode", ["7410", "0f8410000000", "eb10", "e900100000", "7ef0"])
def test_relocated_branch_targets_the_original_absolute_target(hexcode):
    insn = one(hexcode)
    target = insn.instruction.near_branch_target
    slot = relocate(insn, SLOT, boosted=False)
    (copy,) = decode_slot(slot, SLOT)
    assert copy.near_branch_target == target
    assert copy.condition_code == insn.instruction.condition_code
    # stepped: taken leaves the slot for the target (unchanged), not taken ends the copy
    assert step_fixup(insn, slot, SLOT, target) == target
    assert step_fixup(insn, slot, SLOT, SLOT + slot.copy_length) == insn.address + insn.length


@pytest.mark.parametrize("hexcode", ["e210", "e110", "e010", "e310", "67e310", "e2fe", "e3fe"])
def test_relocated_loop_and_jrcxz_map_every_exit(hexcode):
    insn = one(hexcode)
    assert classify(insn).kind is Kind.STEP
    target = insn.instruction.near_branch_target
    slot = relocate(insn, SLOT, boosted=False)
    instructions = decode_slot(slot, SLOT)
    # short branch, jmp short over the stub, jmp rel32 to the original target
    assert instructions[0].code == insn.instruction.code
    assert instructions[-1].code == Code.JMP_REL32_64
    assert instructions[-1].near_branch_target == target
    destinations = {}
    for instruction in instructions:
        if instruction.ip != SLOT:
            destinations[instruction.ip] = step_fixup(insn, slot, SLOT, instruction.ip)
    # the taken branch lands on the stub that jumps to the target
    taken = instructions[0].near_branch_target
    assert step_fixup(insn, slot, SLOT, taken) == target
    # falling through lands on the jmp over the stub: the next original instruction
    assert step_fixup(insn, slot, SLOT, SLOT + instructions[0].len) == insn.address + insn.length
    assert step_fixup(insn, slot, SLOT, SLOT + slot.copy_length) == insn.address + insn.length
    assert set(destinations.values()) == {target, insn.address + insn.length}


def test_loop_to_itself_goes_back_to_the_probe():
    # "loop $": the taken branch must re-execute the probed address (another hit),
    # not spin inside the slot where the probe cannot see it.
    insn = one("e2fe")
    slot = relocate(insn, SLOT, boosted=False)
    taken = decode_slot(slot, SLOT)[0].near_branch_target
    assert taken != SLOT
    assert step_fixup(insn, slot, SLOT, taken) == ORIG


def test_step_fixup_cases():
    insn = one("488b0500100000")
    slot = relocate(insn, SLOT, boosted=True)
    # after the copy (at the jmp back): continue after the original
    assert step_fixup(insn, slot, SLOT, SLOT + slot.copy_length) == ORIG + 7
    # still on the copy (a fault, or rep between iterations): unchanged, step again
    assert step_fixup(insn, slot, SLOT, SLOT) == SLOT
    # anywhere else is an absolute target: unchanged
    assert step_fixup(insn, slot, SLOT, 0x7F00_0000_1234) == 0x7F00_0000_1234


@pytest.mark.parametrize("hexcode", ["c3", "f3c3", "f2c3", "48c3", "c20800", "c2ffff"])
def test_ret_copies_byte_for_byte_and_its_step_lands_outside(hexcode):
    # ret and ret imm16 are boosted: the copy pops the return address and leaves the
    # slot for it, so the jmp back after it is never reached (but must be there and
    # correct, as for any boosted copy).
    insn = one(hexcode)
    assert classify(insn).kind is Kind.BOOST
    slot = relocate(insn, SLOT, boosted=True)
    assert slot.code[:insn.length] == insn.raw and slot.copy_length == insn.length
    copy, back = decode_slot(slot, SLOT)
    assert copy.code == insn.instruction.code and back.near_branch_target == ORIG + insn.length
    assert slot.exits == ((insn.length, ORIG + insn.length),)
    assert return_address_fixup(insn, SLOT, slot) is None and pushed_flags_fixup(insn) == 0
    # Stepped (boost=False): RIP after the step is the popped return address, outside the
    # slot, wherever it is (even right next to the slot, or back at the probed ret itself).
    stepped = relocate(insn, SLOT, boosted=False)
    assert stepped.code == insn.raw
    for where in (0x5555_5555_6789, ORIG, ORIG + insn.length, SLOT - 1, SLOT + SLOT_SIZE):
        assert step_fixup(insn, stepped, SLOT, where) == where
        assert step_fixup(insn, slot, SLOT, where) == where


@pytest.mark.parametrize("hexcode", ["50", "53", "54", "4157"])
def test_push_reg_copies_byte_for_byte(hexcode):
    insn = one(hexcode)
    assert classify(insn).kind is Kind.BOOST
    slot = relocate(insn, SLOT, boosted=True)
    assert slot.code == insn.raw + bytes((0xE9,)) + (ORIG + insn.length - (SLOT + insn.length + 5)).to_bytes(
        4, "little", signed=True)
    assert step_fixup(insn, slot, SLOT, SLOT + insn.length) == ORIG + insn.length
    assert return_address_fixup(insn, SLOT, slot) is None and pushed_flags_fixup(insn) == 0


def test_step_fixup_for_indirect_jump_and_rep():
    jmp = one("ff25f0ffffff")  # jmp [rip-0x10]
    slot = relocate(jmp, SLOT, boosted=False)
    assert step_fixup(jmp, slot, SLOT, 0x7F99_0000_0000) == 0x7F99_0000_0000
    rep = one("f3a4")
    slot = relocate(rep, SLOT, boosted=False)
    assert step_fixup(rep, slot, SLOT, SLOT) == SLOT
    assert step_fixup(rep, slot, SLOT, SLOT + 2) == ORIG + 2


@pytest.mark.parametrize("hexcode", ["ffd0", "ff10", "ff15f0ffffff", "41ffd3", "ff542408"])
def test_return_address_fixup_for_indirect_calls(hexcode):
    insn = one(hexcode)
    slot = relocate(insn, SLOT, boosted=False)
    wrong, right = return_address_fixup(insn, SLOT, slot)
    # the CPU pushes the address after the call it ran: the copy in the slot
    (copy,) = decode_slot(slot, SLOT)
    assert wrong == copy.next_ip == SLOT + slot.copy_length
    assert right == insn.address + insn.length
    if insn.instruction.is_ip_rel_memory_operand:
        assert memory_target(copy) == memory_target(insn.instruction)


def test_return_address_fixup_is_none_for_non_calls():
    for hexcode in ("4883c001", "ffe0", "c3", "e2fe"):
        insn = one(hexcode)
        assert return_address_fixup(insn, SLOT, relocate(insn, SLOT, boosted=False)) is None


def test_pushed_flags_fixup():
    assert pushed_flags_fixup(one("9c")) == 8
    assert pushed_flags_fixup(one("669c")) == 2
    assert pushed_flags_fixup(one("9d")) == 0
    assert pushed_flags_fixup(one("50")) == 0


def test_longest_instructions_fit_the_slot():
    for hexcode in (
        "262626488184c80000000000000000",     # 15 bytes, no RIP-relative operand
        "2e2e2e2e48810500100000ffffff7f",     # 15 bytes, RIP-relative with imm32
        "c5fc2905f0ffffff",                   # vmovaps [rip-0x10],ymm0
    ):
        insn = one(hexcode)
        slot = relocate(insn, SLOT, boosted=True)
        assert len(slot.code) <= SLOT_SIZE
        assert decode_slot(slot, SLOT)[-1].near_branch_target == insn.address + insn.length


def test_high_target_never_becomes_absolute():
    # A target above 4 GiB cannot be absolute [disp32]; iced must keep RIP-relative.
    insn = one("488b0500100000", 0x7FFF_F000_0000)
    slot = relocate(insn, 0x7FFF_F000_0000 + GIB, boosted=False)
    (copy,) = decode_slot(slot, 0x7FFF_F000_0000 + GIB)
    assert copy.memory_base != 0 and copy.is_ip_rel_memory_operand


@settings(max_examples=200, deadline=None)
@given(displacement=st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1),
       slot_offset=st.integers(min_value=-(1 << 32), max_value=1 << 32).map(lambda x: x & ~0x1F),
       boosted=st.booleans())
def test_rip_relative_property(displacement, slot_offset, boosted):
    code = bytes.fromhex("488b05") + displacement.to_bytes(4, "little", signed=True)
    insn = one(code.hex())
    target = ORIG + 7 + displacement
    slot_address = ORIG + slot_offset
    reach = target - (slot_address + 7)
    back = (ORIG + 7) - (slot_address + 12)
    if abs(reach) < (1 << 31) - 64 and (not boosted or abs(back) < (1 << 31) - 64):
        slot = relocate(insn, slot_address, boosted)
        instructions = decode_slot(slot, slot_address)
        assert memory_target(instructions[0]) == target
        if boosted:
            assert instructions[1].near_branch_target == ORIG + 7
        assert step_fixup(insn, slot, slot_address, slot_address + slot.copy_length) == ORIG + 7
    else:
        assume(abs(reach) > (1 << 31) + 64 or (boosted and abs(back) > (1 << 31) + 64))
        with pytest.raises(RelocationError):
            relocate(insn, slot_address, boosted)


@settings(max_examples=100, deadline=None)
@given(opcode=st.integers(0, 15), rel=st.integers(-128, 127),
       slot_offset=st.integers(min_value=-(1 << 30), max_value=1 << 30).map(lambda x: x & ~0x1F))
def test_jcc_property(opcode, rel, slot_offset):
    insn = one(bytes((0x70 + opcode, rel & 0xFF)).hex())
    slot_address = ORIG + slot_offset
    slot = relocate(insn, slot_address, boosted=False)
    (copy,) = decode_slot(slot, slot_address)
    assert copy.op0_kind == OpKind.NEAR_BRANCH64
    assert copy.near_branch_target == ORIG + 2 + rel
    assert copy.condition_code == insn.instruction.condition_code
