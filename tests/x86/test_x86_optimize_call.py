"""optimize: a direct call as a region's last instruction, relocated as push of the original
return address and jmp to the callee (relocate_in_trampoline)."""
from __future__ import annotations

import struct

import pytest
from iced_x86 import Code, Decoder

from pyprobes.x86 import TRAMPOLINE_SLOT_SIZE, Refusal, Region, RelocationError, count_trampoline, find_region
from pyprobes.x86.decode import decode_function
from pyprobes.x86.relocate import relocate_in_trampoline

FUNC = 0x7F12_3400_1000
TRAMPOLINE = 0x7F12_3456_0000
GIB = 1 << 30


def region_of(hexcode: str) -> Region | Refusal:
    code = bytes.fromhex(hexcode.replace(" ", ""))
    return find_region(code, FUNC, len(code), FUNC)


def check_call_copy(code: bytes, address: int, target: int, returns_to: int) -> None:
    """CODE at ADDRESS is push qword [rip+W]; jmp TARGET; W = RETURNS_TO, and nothing else."""
    push, jmp = list(Decoder(64, code[:11], ip=address))
    assert push.code == Code.PUSH_RM64 and push.is_ip_rel_memory_operand
    assert jmp.code == Code.JMP_REL32_64 and jmp.near_branch_target == target
    word = push.ip_rel_memory_address - address
    assert word == 11 and len(code) == 19
    assert struct.unpack_from("<Q", code, word)[0] == returns_to


@pytest.mark.parametrize("hexcode, before", [
    ("e8 00100000 c3", 0),                   # call first
    ("53 e8 00100000 5b c3", 1),             # push rbx; call
    ("4883ec08 e8 00100000 4883c408 c3", 4),  # sub rsp,8; call: the longest prefix
    ("f30f1efa 4883ec08 e8 00100000 4883c408 c3", 4),  # endbr64 skipped
])
def test_a_direct_call_ends_the_region(hexcode, before):
    r = region_of(hexcode)
    assert isinstance(r, Region), r
    call = r.instructions[-1]
    assert call.instruction.code == Code.CALL_REL32_64
    assert r.end == call.address + 5 and r.end - r.start == before + 5


def test_a_call_into_the_region_or_an_indirect_call_is_still_refused():
    # push rbx; call FUNC+1 (byte 1 of the region: the call's own displacement)
    r = region_of("53 e8 fcffffff 5b c3")
    assert isinstance(r, Refusal) and "jumps into" in r.reason
    r = region_of("ff15 00100000 c3")  # call [rip+0x1000]
    assert isinstance(r, Refusal) and "indirect call" in r.reason
    r = region_of("ffd0 4889c7 c3")  # call rax; mov rdi,rax
    assert isinstance(r, Refusal) and "indirect call" in r.reason


@pytest.mark.parametrize("address", [TRAMPOLINE, FUNC - 3 * GIB // 2, FUNC + 3 * GIB // 2])
def test_relocated_call_pushes_the_original_return_address(address):
    (call,) = decode_function(bytes.fromhex("e8 00100000"), FUNC + 0x40)
    check_call_copy(relocate_in_trampoline(call, address), address, FUNC + 0x45 + 0x1000, FUNC + 0x45)


def test_relocated_call_out_of_reach_raises():
    (call,) = decode_function(bytes.fromhex("e8 00100000"), FUNC)
    with pytest.raises(RelocationError, match="call target"):
        relocate_in_trampoline(call, FUNC - 3 * GIB)


@pytest.mark.parametrize("hexcode", [
    "53 e8 00100000 5b c3",
    "4883ec08 e8 00f0ffff 4883c408 c3",
    "7e07 7c05 e8 00100000 c3 c3",  # jle; jl to region.end (both widened to rel32); call: the largest
])
def test_count_trampoline_with_a_call(hexcode):
    region = region_of(hexcode)
    assert isinstance(region, Region), region
    t = count_trampoline(region, TRAMPOLINE, TRAMPOLINE + 0xF00)
    assert len(t.code) <= TRAMPOLINE_SLOT_SIZE
    # the relocated instructions, in order: every one before the call decodes as itself
    *before, (push_at, call_address) = t.relocated
    call = region.instructions[-1]
    assert call_address == call.address
    assert t.original_address(push_at) == call.address
    assert t.original_address(push_at + 6) is None  # on the jmp: no original equivalent
    offset = push_at - TRAMPOLINE
    check_call_copy(t.code[offset:offset + 19], push_at, call.instruction.near_branch_target, region.end)
    for (here, original), insn in zip(before, region.instructions):
        copy = Decoder(64, t.code[here - TRAMPOLINE:], ip=here).decode()
        assert copy.mnemonic == insn.instruction.mnemonic and original == insn.address
    # nothing runs on after the call's jmp: no jmp back (return_jump is the end, unreachable)
    assert offset + 19 == len(t.code) and t.return_jump == t.end
