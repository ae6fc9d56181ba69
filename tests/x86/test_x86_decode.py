"""decode: instruction boundaries, mid-instruction refusal, invalid bytes."""
from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Code

from pyprobes.x86.decode import Insn, MidInstructionError, decode_function, instruction_at

# push rbp; mov rbp,rsp; mov [rbp-4],edi; mov eax,[rbp-4]; add eax,eax; pop rbp; ret
PROLOGUE = bytes.fromhex("55 4889e5 897dfc 8b45fc 01c0 5d c3")
PROLOGUE_LENGTHS = [1, 3, 3, 3, 2, 1, 1]
HIGH = 0x7F12_3400_1000


def test_boundaries_of_a_small_function():
    insns = decode_function(PROLOGUE, 0x401000)
    assert [i.length for i in insns] == PROLOGUE_LENGTHS
    address = 0x401000
    for insn in insns:
        assert insn.address == address
        assert insn.raw == PROLOGUE[address - 0x401000:address - 0x401000 + insn.length]
        assert insn.instruction.ip == address
        assert insn.next_address == address + insn.length
        address += insn.length
    assert address == 0x401000 + len(PROLOGUE)
    assert [i.text for i in insns] == [
        "push rbp", "mov rbp,rsp", "mov [rbp-4],edi", "mov eax,[rbp-4]", "add eax,eax", "pop rbp", "ret"]


def test_text_is_intel_with_python_hex():
    (lea,) = decode_function(bytes.fromhex("488d047f"), 0x1000)
    assert lea.text == "lea rax,[rdi+rdi*2]"
    (lea,) = decode_function(bytes.fromhex("488d447f01"), 0x1000)
    assert lea.text == "lea rax,[rdi+rdi*2+1]"
    (jmp,) = decode_function(bytes.fromhex("e9fb0f0000"), HIGH)
    assert jmp.text == f"jmp {HIGH + 0x1000:#x}"
    (load,) = decode_function(bytes.fromhex("488b0500100000"), HIGH)
    assert load.text == f"mov rax,[{HIGH + 7 + 0x1000:#x}]"


def test_insn_is_frozen():
    (insn,) = decode_function(b"\x90", 0x1000)
    assert isinstance(insn, Insn)
    with pytest.raises(Exception):
        insn.address = 0  # type: ignore[misc]


def test_instruction_at_each_boundary():
    insns = decode_function(PROLOGUE, 0x401000)
    for insn in insns:
        found = instruction_at(PROLOGUE, 0x401000, insn.address)
        assert (found.address, found.length, found.raw, found.text) == (
            insn.address, insn.length, insn.raw, insn.text)
        assert found.instruction.code == insn.instruction.code


def test_mid_instruction_error_names_both_boundaries():
    # add rax,1 (4 bytes) at 0x401230, then mov eax,[rip+0] (6 bytes) at 0x401234
    code = bytes.fromhex("4883c001 8b0500000000 c3")
    with pytest.raises(MidInstructionError) as info:
        instruction_at(code, 0x401230, 0x401236)
    error = info.value
    assert isinstance(error, ValueError)
    assert (error.address, error.before, error.after) == (0x401236, 0x401234, 0x40123A)
    assert str(error) == "0x401236 is inside the instruction at 0x401234 (next boundary 0x40123a)"
    # every interior byte is refused, every boundary accepted
    for address in range(0x401230, 0x401230 + len(code)):
        if address in (0x401230, 0x401234, 0x40123A):
            assert instruction_at(code, 0x401230, address).address == address
        else:
            with pytest.raises(MidInstructionError):
                instruction_at(code, 0x401230, address)


def test_mid_instruction_error_pickles():
    error = MidInstructionError(0x401236, 0x401234, 0x40123A)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.address, copy.before, copy.after, str(copy)) == (
        error.address, error.before, error.after, str(error))


@pytest.mark.parametrize("address", [0x400FFF, 0x401000 + len(PROLOGUE), 0])
def test_outside_the_buffer_is_a_value_error(address):
    with pytest.raises(ValueError) as info:
        instruction_at(PROLOGUE, 0x401000, address)
    assert not isinstance(info.value, MidInstructionError)
    assert "outside" in str(info.value)


def test_invalid_bytes_are_reported_and_decoding_goes_on():
    # 0x06 (push es) is invalid in 64-bit mode; iced skips what it read (here
    # the 0x06 and the nop), so boundaries after invalid bytes are guesses
    code = bytes.fromhex("06 90 c3 4883c001")
    insns = decode_function(code, 0x1000)
    assert insns[0].instruction.code == Code.INVALID
    assert insns[0].is_invalid and insns[0].length >= 1
    assert insns[0].text == "(bad)"
    assert [i.text for i in insns[-2:]] == ["ret", "add rax,1"]
    assert sum(i.length for i in insns) == len(code)


def test_truncated_last_instruction_is_invalid():
    code = bytes.fromhex("90 488b05 0010")  # mov rax,[rip+disp32] cut short
    insns = decode_function(code, 0x1000)
    assert insns[0].text == "nop"
    assert insns[-1].instruction.code == Code.INVALID
    assert insns[-1].address == 0x1001 and insns[-1].length == len(code) - 1


def test_empty_buffer():
    assert decode_function(b"", 0x1000) == []
    with pytest.raises(ValueError):
        instruction_at(b"", 0x1000, 0x1000)


def test_accepts_bytearray_and_memoryview():
    assert [i.length for i in decode_function(bytearray(PROLOGUE), 0x1000)] == PROLOGUE_LENGTHS
    assert instruction_at(memoryview(PROLOGUE), 0x1000, 0x1001).text == "mov rbp,rsp"


@settings(max_examples=150, deadline=None)
@given(code=st.binary(min_size=1, max_size=64),
       base=st.integers(min_value=0, max_value=0x7FFF_FFFF_F000))
def test_boundaries_tile_any_buffer(code, base):
    insns = decode_function(code, base)
    address = base
    for insn in insns:
        assert insn.address == address and insn.length >= 1
        address += insn.length
    assert address == base + len(code)
    starts = {i.address: i for i in insns}
    for insn in insns:
        for address in range(insn.address, insn.address + insn.length):
            if address in starts:
                assert instruction_at(code, base, address).raw == starts[address].raw
            else:
                with pytest.raises(MidInstructionError) as info:
                    instruction_at(code, base, address)
                assert (info.value.before, info.value.after) == (insn.address, insn.next_address)
