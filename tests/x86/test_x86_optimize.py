"""optimize: the region a 5-byte jmp may replace, the count trampoline, and the patch.

Addresses are real 64-bit ones on purpose: when a target fits in 32 bits iced quietly switches
to absolute addressing, which would hide a wrong re-targeting.
"""
from __future__ import annotations

import pytest
from iced_x86 import Code, Decoder, FlowControl, Mnemonic, OpKind, Register

from pyprobes.symbols import ElfFile
from pyprobes.x86 import (
    JMP_REL32_LENGTH,
    RED_ZONE,
    MidInstructionError,
    Refusal,
    RefusalKind,
    Region,
    TRAMPOLINE_SLOT_SIZE,
    RelocationError,
    count_trampoline,
    find_region,
    jump_patch,
)
from pyprobes.x86.decode import _FORMATTER, decode_function

FUNC = 0x7F12_3400_1000
TRAMPOLINE = 0x7F12_3456_0000
COUNTER = TRAMPOLINE + 0xF00
GIB = 1 << 30

ENDBR64 = "f30f1efa"
JCC_REL32 = tuple(getattr(Code, f"{cc}_REL32_64") for cc in (
    "JO", "JNO", "JB", "JAE", "JE", "JNE", "JBE", "JA", "JS", "JNS", "JP", "JNP", "JL", "JGE", "JLE", "JG"))


def region_of(hexcode: str, probe_offset: int = 0, size: int | None = None) -> Region | Refusal:
    code = bytes.fromhex(hexcode.replace(" ", ""))
    return find_region(code, FUNC, len(code) if size is None else size, FUNC + probe_offset)


def texts(region: Region) -> list[str]:
    return [insn.text for insn in region.instructions]


def refused(result, kind: RefusalKind) -> str:
    assert isinstance(result, Refusal), result
    assert result.kind is kind, result.reason
    return result.reason


# --- regions ---------------------------------------------------------------------------

def test_lea_prologue_is_two_whole_instructions():
    r = region_of("488d4701 4801f0 c3")  # lea rax,[rdi+1]; add rax,rsi; ret
    assert isinstance(r, Region)
    assert (r.start, r.end, r.skipped, r.probe_address) == (FUNC, FUNC + 7, 0, FUNC)
    assert texts(r) == ["lea rax,[rdi+1]", "add rax,rsi"]


def test_exactly_five_bytes_is_one_instruction():
    r = region_of("488d44b701 c3")  # lea rax,[rdi+rsi*4+1]; ret
    assert isinstance(r, Region)
    assert r.length == JMP_REL32_LENGTH and len(r.instructions) == 1


def test_push_prologue():
    r = region_of("55 4889e5 897dfc 8b45fc 5d c3")  # push rbp; mov rbp,rsp; mov [rbp-4],edi; ...
    assert isinstance(r, Region)
    assert texts(r) == ["push rbp", "mov rbp,rsp", "mov [rbp-4],edi"]
    assert r.end == FUNC + 7


def test_endbr64_at_the_entry_is_skipped():
    r = region_of(ENDBR64 + "55 4889e5 4883ec10 c9 c3")  # endbr64; push rbp; mov rbp,rsp; sub rsp,16
    assert isinstance(r, Region)
    assert (r.start, r.skipped, r.probe_address) == (FUNC + 4, 4, FUNC)
    assert texts(r) == ["push rbp", "mov rbp,rsp", "sub rsp,0x10"]


def test_endbr64_is_not_skipped_for_a_probe_after_it():
    r = region_of(ENDBR64 + "55 4889e5 4883ec10 c9 c3", probe_offset=4)
    assert isinstance(r, Region)
    assert (r.start, r.skipped) == (FUNC + 4, 0)


def test_a_branch_to_the_skipped_endbr64_or_to_the_first_byte_is_fine():
    # endbr64; push rbp; mov rbp,rsp; sub rsp,16; jmp <entry>; jmp <region start>
    r = region_of(ENDBR64 + "55 4889e5 4883ec10 ebf2 ebf4")
    assert isinstance(r, Region), r
    assert r.start == FUNC + 4


def test_rip_relative_mov_is_displaced():
    r = region_of("488b0500100000 c3")  # mov rax,[rip+0x1000]; ret
    assert isinstance(r, Region)
    assert r.end == FUNC + 7
    assert r.instructions[0].instruction.ip_rel_memory_address == FUNC + 7 + 0x1000


def test_mid_function_probe():
    # push rbx; mov rbx,rdi; mov eax,1; add rax,rbx; pop rbx; ret: probe on the mov eax,1
    r = region_of("53 4889fb b801000000 4801d8 5b c3", probe_offset=4)
    assert isinstance(r, Region)
    assert (r.start, r.end) == (FUNC + 4, FUNC + 9)


def test_loop_branching_back_into_the_region_is_refused():
    # xor eax,eax; L: inc eax; cmp eax,10; jne L; ret: the loop head is at byte 2 of the region
    reason = refused(region_of("31c0 ffc0 83f80a 75f9 c3"), RefusalKind.BRANCH_INTO)
    assert f"a branch at {FUNC + 7:#x} jumps into the patched bytes" in reason
    assert f"(to {FUNC + 2:#x})" in reason


def test_a_function_shorter_than_a_jmp_is_refused():
    reason = refused(region_of("31c0 c3"), RefusalKind.TOO_SHORT)
    assert reason.startswith("the function is 3 bytes long")


def test_a_region_past_the_end_is_refused():
    reason = refused(region_of("4883c701 4889f8 c3", probe_offset=4), RefusalKind.TOO_SHORT)
    assert f"only 4 bytes are left from {FUNC + 4:#x}" in reason


def test_an_indirect_jmp_anywhere_in_the_function_is_refused():
    # sub rsp,8; mov [rsp+8],rdi; ...; jmp rax (a switch dispatch far from the entry)
    reason = refused(region_of("4883ec08 48897c2408 ffe0 c3"), RefusalKind.INDIRECT_JUMP)
    assert f"'jmp rax' at {FUNC + 9:#x}" in reason
    reason = refused(region_of("4883ec08 48897c2408 ff24c5 00100000"), RefusalKind.INDIRECT_JUMP)
    assert "jump table" in reason


@pytest.mark.parametrize("hexcode, what", [
    ("ff1500100000 c3", "call"),            # call [rip+0x1000] (a direct call: test_x86_optimize_call)
    ("4883ec08 ffd0 c3", "call"),           # sub rsp,8; call rax
    ("31c0 c3 90909090", "does not fall through"),  # xor eax,eax; ret; nops inside the region
    ("31c0 eb03 31c9 90 c3", "does not fall through"),  # xor; jmp over a dead xor in the region
    ("31c0 0f05 c3 9090", "syscall"),
    ("cc 4889f8 c3", "another breakpoint"),  # a debugger's int3
    ("cd80 4889f8 c3", "int"),               # int 0x80
    ("4889f8 ffe0 90 c3", "indirect jump"),  # mov; jmp rax
    ("4889f8 e203 90 c3 90 c3", "short-only"),  # mov; loop
    ("4889f8 e303 90 c3 90 c3", "short-only"),  # mov; jrcxz
    ("c7f800000000 c3", "transactional"),    # xbegin
    ("4889f8 cb 9090 c3", "far jmp/ret"),     # mov; retf
])
def test_control_flow_in_the_region_is_refused(hexcode, what):
    reason = refused(region_of(hexcode), RefusalKind.CONTROL_FLOW)
    assert "within the 5 bytes a jmp needs" in reason and what in reason


def test_jcc_rel8_in_the_region():
    # test edi,edi; je L; lea rax,[rdi+1]; ret; L: mov eax,100; ret
    r = region_of("85ff 7405 488d4701 c3 b864000000 c3")
    assert isinstance(r, Region), r
    assert (r.start, r.end) == (FUNC, FUNC + 8)
    assert texts(r) == ["test edi,edi", f"je {FUNC + 9:#x}", "lea rax,[rdi+1]"]


def test_a_region_ending_in_jmp_or_ret():
    # lea rax,[rdi+4]; jmp L (rel8, over a ud2); L: add rax,1; ret
    r = region_of("488d4704 eb02 0f0b 4883c001 c3")
    assert isinstance(r, Region), r
    assert r.end == FUNC + 6 and texts(r)[-1] == f"jmp {FUNC + 8:#x}"
    # test edi,edi; jne L; ret; L: mov [rsi],rdi; ret: the jne targets region.end
    r = region_of("85ff 7501 c3 48893e c3")
    assert isinstance(r, Region), r
    assert r.end == FUNC + 5 and texts(r) == ["test edi,edi", f"jne {FUNC + 5:#x}", "ret"]
    r = region_of("e9 00100000")  # a tail call: jmp rel32, the whole function
    assert isinstance(r, Region) and texts(r) == [f"jmp {FUNC + 5 + 0x1000:#x}"]


def test_a_branch_in_the_region_to_its_first_byte_is_fine_past_it_is_not():
    # L: test edi,edi; jne L (a spin on the probe address: each round is a hit)
    r = region_of("85ff 75fc 90 c3")
    assert isinstance(r, Region), r
    # xor eax,eax; L: dec edi; jne L: the jne targets byte 2 of its own region
    reason = refused(region_of("31c0 ffcf 75fc c3"), RefusalKind.BRANCH_INTO)
    assert f"a branch at {FUNC + 4:#x} jumps into" in reason


@pytest.mark.parametrize("hexcode, why", [
    ("f0480fc13e c3", "lock prefix"),            # lock xadd [rsi],rdi
    ("f348a5 31c0 c3", "rep prefix"),            # rep movsq
])
def test_instructions_that_are_not_boosted_are_refused(hexcode, why):
    reason = refused(region_of(hexcode), RefusalKind.NOT_RELOCATABLE)
    assert why in reason


def test_nops_are_displaced():
    r = region_of("0f1f440000 4889f8 c3")  # the 5-byte nop the kernel optimises on
    assert isinstance(r, Region) and texts(r) == ["nop [rax+rax]"]


def test_an_endbr64_inside_the_region_is_refused():
    reason = refused(region_of("31c0" + ENDBR64 + "c3"), RefusalKind.ENDBR_INSIDE)
    assert f"endbr64 at {FUNC + 2:#x}" in reason


def test_an_address_into_the_region_is_refused():
    # xor eax,eax; mov ecx,1; ...; lea rdx,[rip-N] pointing at byte 2 (a hand-made return address)
    code = "31c0 b901000000 488d15f4ffffff c3"
    reason = refused(region_of(code), RefusalKind.ADDRESS_INTO)
    assert f"takes the address {FUNC + 2:#x}" in reason


def test_unknown_size_and_undecodable_code_are_refused():
    refused(region_of("4889f8 4801f0 c3", size=0), RefusalKind.NO_SIZE)
    refused(region_of("4889f8 4801f0 c3 06"), RefusalKind.UNDECODABLE)  # 06: push es, invalid in 64-bit


def test_bad_probe_addresses_raise():
    with pytest.raises(MidInstructionError):
        region_of("4889f8 4801f0 c3", probe_offset=1)
    with pytest.raises(ValueError):
        region_of("4889f8 4801f0 c3", probe_offset=7)
    with pytest.raises(ValueError):
        find_region(bytes.fromhex("4889f8"), FUNC, 7, FUNC)


# --- trampoline and patch ----------------------------------------------------------------

def decode(code: bytes, address: int):
    return list(Decoder(64, code, ip=address))


def check_count_trampoline(region: Region, address: int, counter: int) -> None:
    """The trampoline decodes as exactly the count action, the region's instructions, the jmp back."""
    t = count_trampoline(region, address, counter)
    insns = decode(t.code, address)
    assert sum(i.len for i in insns) == len(t.code)
    action, rest = insns[:9], insns[9:]

    down, push, seto, lahf, inc, add, sahf, pop, up = action
    assert down.code == Code.LEA_R64_M and down.op0_register == Register.RSP
    assert down.memory_base == Register.RSP and down.memory_displacement == (-RED_ZONE) & (2**64 - 1)
    # the flags inc changes saved in rax, not with pushfq/popfq (action.py)
    assert push.code == Code.PUSH_R64 and push.op0_register == Register.RAX
    assert seto.code == Code.SETO_RM8 and seto.op0_register == Register.AL
    assert lahf.code == Code.LAHF
    assert inc.code == Code.INC_RM64 and inc.has_lock_prefix
    assert inc.is_ip_rel_memory_operand and inc.ip_rel_memory_address == counter
    assert add.code == Code.ADD_RM8_IMM8 and add.op0_register == Register.AL and add.immediate8 == 0x7F
    assert sahf.code == Code.SAHF
    assert pop.code == Code.POP_R64 and pop.op0_register == Register.RAX
    assert up.code == Code.LEA_R64_M and up.op0_register == Register.RSP
    assert up.memory_base == Register.RSP and up.memory_displacement == RED_ZONE
    assert t.counted_offset is None and t.flag_pushes == tuple(
        (here, width) for here, width in t.flag_pushes if here >= up.next_ip)  # no pushfq: stepped
    assert t.relocated_offset == up.next_ip - address

    copies, tail = rest[:len(region.instructions)], rest[len(region.instructions):]
    assert len(copies) == len(region.instructions)
    assert [(c.ip, o.address) for c, o in zip(copies, region.instructions)] == list(t.relocated)
    for copy, original in zip(copies, region.instructions):
        # Formatted at their own addresses, a RIP-relative operand shows its absolute target.
        assert _FORMATTER.format(copy) == original.text
        assert copy.flow_control == original.instruction.flow_control
        if copy.op0_kind == OpKind.NEAR_BRANCH64:  # the same target, in the rel32 form
            assert copy.near_branch_target == original.instruction.near_branch_target
            assert copy.code in (Code.JMP_REL32_64, *JCC_REL32), copy.code
            assert copy.mnemonic == original.instruction.mnemonic
        assert copy.is_ip_rel_memory_operand == original.instruction.is_ip_rel_memory_operand
        if copy.is_ip_rel_memory_operand:
            assert copy.ip_rel_memory_address == original.instruction.ip_rel_memory_address
    assert len(t.code) <= TRAMPOLINE_SLOT_SIZE
    if copies[-1].flow_control in (FlowControl.RETURN, FlowControl.UNCONDITIONAL_BRANCH):
        assert tail == [] and t.return_jump == t.end  # nothing runs on: no jmp back
    else:
        (back,) = tail
        assert back.code == Code.JMP_REL32_64 and back.near_branch_target == region.end
        assert back.ip == t.return_jump and back.next_ip == t.end
        assert t.original_address(t.return_jump) == region.end

    for here, original in t.relocated:
        assert t.original_address(here) == original
    assert t.original_address(address) is None and t.original_address(t.return_jump + 1) is None


def check_patch(region: Region, trampoline: int) -> None:
    patch = jump_patch(region, trampoline)
    assert len(patch) == region.length
    jmp, *pad = decode(patch, region.start)
    assert jmp.code == Code.JMP_REL32_64 and jmp.near_branch_target == trampoline
    assert all(p.code == Code.INT3 for p in pad) and len(pad) == region.length - JMP_REL32_LENGTH


@pytest.mark.parametrize("hexcode", [
    "488d4701 4801f0 c3",
    ENDBR64 + "55 4889e5 4883ec10 c9 c3",
    "488b0500100000 c3",
    "4889f8 48030500e0ffff 48890500100000 c3",  # mov; add rax,[rip-0x2000]; mov [rip+0x1000],rax
    "85ff 7405 488d4701 c3 b864000000 c3",      # test; je rel8 (-> rel32); lea
    "85ff 74f0 eb10 c3",                        # test; je rel8 backwards; jmp rel8 (both widened)
    "85ff 7501 c3 48893e c3",                   # test; jne; ret
    "488d4704 eb02 0f0b 4883c001 c3",           # lea; jmp rel8 over a ud2
    "4885ff 0f8400100000 c3",                   # test; je rel32 (kept)
    "7e10 7c0e 488b0500100000 c3",              # jle; jl; mov rax,[rip+0x1000]: the longest mix
    "e9 00100000",                              # jmp rel32: a tail call
])
@pytest.mark.parametrize("trampoline", [TRAMPOLINE, FUNC - 3 * GIB // 2, FUNC + 3 * GIB // 2])
def test_count_trampoline_and_patch(hexcode, trampoline):
    region = region_of(hexcode)
    assert isinstance(region, Region)
    check_count_trampoline(region, trampoline, trampoline + 0xF00)
    check_patch(region, trampoline)


def test_out_of_reach_raises():
    region = region_of("488b0500100000 c3")
    with pytest.raises(RelocationError, match="counter"):
        count_trampoline(region, TRAMPOLINE, TRAMPOLINE + 3 * GIB)
    with pytest.raises(RelocationError):  # the RIP-relative operand and region.end: 3 GiB away
        count_trampoline(region, FUNC + 3 * GIB, FUNC + 3 * GIB + 0xF00)
    with pytest.raises(RelocationError, match="±2 GiB"):
        jump_patch(region, FUNC + 3 * GIB)
    plain = region_of("488d4701 4801f0 c3")
    with pytest.raises(RelocationError, match="jmp back"):
        count_trampoline(plain, FUNC - 3 * GIB, FUNC - 3 * GIB + 0xF00)
    # jmp rel32 to FUNC+2 GiB-11: in reach of the function, not of a trampoline 256 MiB below it
    far = region_of("e9 f0ffff7f")
    below = FUNC - (256 << 20)
    count_trampoline(far, FUNC + (256 << 20), FUNC + (256 << 20) + 0xF00)  # above: in reach
    with pytest.raises(RelocationError, match=f"branch target {FUNC + 5 + 0x7FFFFFF0:#x}"):
        count_trampoline(far, below, below + 0xF00)


# --- real code from a compiled fixture ---------------------------------------------------------

@pytest.mark.parametrize("flags", [(), ("-fcf-protection=full",)], ids=["plain", "endbr64"])
@pytest.mark.parametrize("name, first", [
    ("bump", Mnemonic.MOV),        # mov rax,rdi; add rax,[rip+counter]
    ("scaled", Mnemonic.LEA),      # lea rax,[rdi+rsi*4+1]
    ("sum_bumps", Mnemonic.PUSH),  # push r13; push r12; push rbp
])
def test_real_function(fixture, flags, name, first):
    elf = ElfFile.load(fixture("opt_region", *flags))
    (sym,) = [s for s in elf.functions if s.name == name]
    code = elf.read_vaddr(sym.address, sym.size)
    # The same bytes at a high address: RIP-relative targets move with the function.
    region = find_region(code, FUNC, sym.size, FUNC)
    assert isinstance(region, Region), region
    assert region.skipped == (4 if flags else 0)
    assert region.instructions[0].instruction.mnemonic == first
    if name == "bump":
        assert any(i.instruction.is_ip_rel_memory_operand for i in region.instructions)
    check_count_trampoline(region, TRAMPOLINE, COUNTER)
    check_patch(region, TRAMPOLINE)


def test_real_mid_function_probe_where_a_branch_lands_on_the_first_byte(fixture):
    elf = ElfFile.load(fixture("opt_region"))
    (sym,) = [s for s in elf.functions if s.name == "sum_bumps"]
    code = elf.read_vaddr(sym.address, sym.size)
    # gcc's -O1 sum_bumps ends with "mov r13d,0; jmp <the epilogue>": probe the jmp's target.
    jumps = [i for i in decode_function(code, FUNC)
             if i.instruction.code in (Code.JMP_REL8_64, Code.JMP_REL32_64)]
    assert jumps, "no direct jmp in sum_bumps"
    target = jumps[-1].instruction.near_branch_target
    region = find_region(code, FUNC, sym.size, target)
    assert isinstance(region, Region), region
    assert region.start == target and region.skipped == 0
    check_count_trampoline(region, TRAMPOLINE, COUNTER)


# --- through the engine: branches run from the trampoline ------------------------------------

def test_optimized_probes_on_branches_count_exactly(procs, fixture):
    """opt_branch.c: functions starting with test; je rel8 / jne rel8; ret / lea; jmp rel8 /
    test; je rel32, each called with both directions of its branch by 2 threads: every probe
    is optimised, counts every call and every result is right."""
    calls, threads = 20_000, 2
    run = procs.spawn(fixture("opt_branch"), calls, threads)
    proc = run.proc
    probes = {name: proc.probe(f"opt_{name}", action="count") for name in ("br", "ret", "tail", "near")}
    assert run.finish() == 0, run.text
    counted = run.results[("calls",)]
    assert counted.pop("bad") == 0 and run.results[()]["sigtrap"] == 0, run.text
    assert counted == {name: calls * threads for name in probes}
    for name, probe in probes.items():
        assert (name, probe.mode, probe.not_optimized) == (name, "optimized", "")
        assert (name, probe.hits, probe.missed) == (name, calls * threads, 0)


def test_optimise_and_unoptimise_branch_regions_while_threads_run(procs, fixture):
    """50 rounds of optimising the four branch probes and removing them while 4 threads call
    the functions: a thread found in a trampoline at removal is moved out (a dead one's
    relocated jcc/jmp/ret mapped back to the original), every result stays right and no
    count exceeds the calls."""
    run = procs.spawn(fixture("opt_branch"), 0, 4, stdin_pipe=True)
    proc = run.proc
    run.run_until(r"^ready")
    hits = dict.fromkeys(("br", "ret", "tail", "near"), 0)
    for _ in range(50):
        probes = {name: proc.probe(f"opt_{name}", action="count") for name in hits}
        proc.run(timeout=0.002)  # optimised as run() starts
        for name, probe in probes.items():
            assert (name, probe.mode) == (name, "optimized"), probe.not_optimized
            probe.remove()
            hits[name] += probe.hits
    assert proc.trampolines.stats()["collections"] > 0
    proc.detach()
    run.close_stdin()
    assert run.wait_exit() == 0, run.text
    calls = run.results[("calls",)]
    assert calls.pop("bad") == 0 and run.results[()]["sigtrap"] == 0, run.text
    assert all(0 < hits[name] <= calls[name] for name in hits), (hits, calls)
