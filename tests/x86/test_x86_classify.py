"""classify: a table of real encodings, one or more per rule."""
from __future__ import annotations

import pytest
from iced_x86 import Code, Encoder, Instruction, MemoryOperand, Register

from pyprobes.x86.classify import (
    CALL_REL_CODES,
    EMULATED_CODES,
    JCC_CODES,
    JMP_REL_CODES,
    NOP_CODES,
    Classification,
    Kind,
    classify,
    legacy_prefixes,
)
from pyprobes.x86.decode import decode_function

R, E, S, B = Kind.REFUSE, Kind.EMULATE, Kind.STEP, Kind.BOOST
HIGH = 0x7F12_3400_1000


def one(code: bytes, address: int = HIGH):
    insns = decode_function(code, address)
    assert len(insns) == 1, [i.text for i in insns]
    return insns[0]


def assemble(instruction: Instruction, address: int = HIGH) -> bytes:
    encoder = Encoder(64)
    encoder.encode(instruction, address)
    return encoder.take_buffer()


TABLE: list[tuple[str, Kind, str]] = [
    # --- refuse ---
    ("06", R, "invalid"),                       # push es: invalid in 64-bit mode
    ("ce", R, "invalid"),                       # into: invalid in 64-bit mode
    ("d6", R, "invalid"),                       # salc: invalid in 64-bit mode
    ("9a", R, "invalid"),                       # call ptr16:32: invalid in 64-bit mode
    ("cc", R, "int3"),
    ("cd03", R, "int n"),
    ("cd80", R, "int n"),
    ("f1", R, "int1"),
    ("0f05", R, "syscall"),
    ("0f34", R, "syscall"),                     # sysenter
    ("0f07", R, None),                          # sysret
    ("f4", R, "privileged"),                    # hlt
    ("ec", R, "privileged"),                    # in al,dx
    ("e660", R, "privileged"),                  # out 0x60,al
    ("fa", R, "privileged"),                    # cli
    ("fb", R, "privileged"),                    # sti
    ("0f0110", R, "privileged"),                # lgdt [rax]
    ("0f22d8", R, "privileged"),                # mov cr3,rax
    ("0f30", R, "privileged"),                  # wrmsr
    ("cf", R, "iret"),
    ("48cf", R, "iret"),
    ("0f0b", R, "ud"),
    ("0fff00", R, "ud"),
    ("0fb900", R, "ud"),
    ("c7f800000000", R, "xbegin"),
    ("0f01d5", R, "xend"),
    ("c6f800", R, "xabort"),
    ("8ed0", R, "mov/pop ss"),
    ("ff1c24", R, "far call"),
    ("48ff1c24", R, "far call"),
    ("66eb00", R, "operand-size prefix"),       # jmp short with 66
    ("66e900000000", R, "operand-size prefix"),
    ("66c3", R, "operand-size prefix"),
    ("660f8400000000", R, "operand-size prefix"),
    # --- emulate ---
    ("eb00", E, "relative jmp"),
    ("ebfe", E, "relative jmp"),                # jmp $
    ("e900000000", E, "relative jmp"),
    ("f2e900000000", E, "relative jmp"),        # bnd jmp
    ("e800000000", E, "call rel32"),
    ("666648e800000000", E, "call rel32"),      # data16 data16 rex.W call: TLS __tls_get_addr
    ("f2e800000000", E, "call rel32"),          # bnd call
    ("90", E, "nop"),
    ("6690", E, "nop"),
    ("4890", E, "nop"),
    ("0f1f00", E, "nop"),
    ("0f1f4000", E, "nop"),
    ("0f1f440000", E, "nop"),                   # nop dword [rax+rax]
    ("660f1f440000", E, "nop"),
    ("0f1f8000000000", E, "nop"),
    ("0f1f840000000000", E, "nop"),
    ("660f1f840000000000", E, "nop"),
    ("662e0f1f840000000000", E, "nop"),         # cs nopw: gcc's padding
    ("66662e0f1f840000000000", E, "nop"),
    ("f30f1efa", E, "endbr"),
    ("f30f1efb", E, "endbr"),
    ("2e7400", E, "conditional jump"),          # branch-not-taken hint
    ("3e7400", E, "conditional jump"),          # branch-taken hint
    # --- step ---
    ("e2fe", S, "loop"),
    ("e1fe", S, "loop"),                        # loope
    ("e0fe", S, "loop"),                        # loopne
    ("e3fe", S, "loop"),                        # jrcxz
    ("67e3fe", S, "loop"),                      # jecxz
    ("67e2fe", S, "loop"),                      # loop using ecx
    ("ffd0", S, "indirect call"),               # call rax
    ("41ffd3", S, "indirect call"),             # call r11
    ("ff10", S, "indirect call"),               # call [rax]
    ("ff15f0ffffff", S, "indirect call"),       # call [rip-0x10]
    ("ff542408", S, "indirect call"),           # call [rsp+8]
    ("ffe0", S, "indirect jmp"),                # jmp rax
    ("ff20", S, "indirect jmp"),                # jmp [rax]
    ("ff25f0ffffff", S, "indirect jmp"),        # jmp [rip-0x10]: a PLT stub
    ("f2ff25f0ffffff", S, "indirect jmp"),      # bnd jmp [rip-0x10]
    ("3effe0", S, "indirect jmp"),              # notrack jmp rax
    ("ff2c24", S, "far jmp"),
    ("cb", S, "far jmp/ret"),
    ("48cb", S, "far jmp/ret"),
    ("ca0800", S, "far jmp/ret"),
    ("f0ff00", S, "lock"),                      # lock inc dword [rax]
    ("f0480fb10f", S, "lock"),                  # lock cmpxchg [rdi],rcx
    ("f0480fc107", S, "lock"),                  # lock xadd [rdi],rax
    ("f2f0830001", S, "lock"),                  # xacquire lock add dword [rax],1
    ("f3a4", S, "rep prefix"),                  # rep movsb
    ("f348ab", S, "rep prefix"),                # rep stosq
    ("f2ae", S, "rep prefix"),                  # repne scasb
    ("f3a6", S, "rep prefix"),                  # repe cmpsb
    ("d920", S, "x87"),                         # fldenv
    ("dd20", S, "x87"),                         # frstor
    ("0fae08", S, "x87"),                       # fxrstor
    ("480fae08", S, "x87"),                     # fxrstor64
    ("0fae28", S, "x87"),                       # xrstor
    ("0fc71f", R, "privileged"),                # xrstors: ring 0 only
    ("d92f", S, "x87"),                         # fldcw
    ("dbe3", S, "x87"),                         # fninit
    ("dbe2", S, "x87"),                         # fnclex
    ("dd30", S, "x87"),                         # fnsave
    ("d930", S, "x87"),                         # fnstenv
    ("678b00", S, "address-size"),              # mov eax,[eax]
    ("678b05f0ffffff", S, "address-size"),      # mov eax,[eip-0x10]
    ("2e8b00", S, "CS segment"),                # cs mov eax,[rax]
    ("2ec3", S, "CS segment"),                  # cs ret: never boosted, as in can_boost()
    ("67c3", S, "address-size"),                # addr32 ret
    # --- boost ---
    # push reg and ret: boosting costs fewer system calls per hit than emulating
    ("c3", B, "ret"),
    ("f3c3", B, "ret"),                         # rep ret (old AMD branch-predictor idiom)
    ("f2c3", B, "ret"),                         # bnd ret
    ("48c3", B, "ret"),                         # rex.W ret
    ("c20800", B, "ret"),
    ("c2ffff", B, "ret"),                       # ret 0xffff
    ("50", B, None),                            # push rax
    ("53", B, None),                            # push rbx
    ("54", B, None),                            # push rsp
    ("4157", B, None),                          # push r15
    ("4883c001", B, None),                      # add rax,1
    ("488d447f01", B, None),                    # lea rax,[rdi+rdi*2+1]
    ("4889e5", B, None),                        # mov rbp,rsp
    ("488b07", B, None),
    ("48890424", B, None),                      # mov [rsp],rax
    ("ff30", B, None),                          # push qword [rax]
    ("8f00", B, None),                          # pop qword [rax]
    ("6a01", B, None),                          # push 1
    ("6800100000", B, None),                    # push 0x1000
    ("58", B, None),                            # pop rax
    ("6650", B, None),                          # push ax: not a plain 64-bit push
    ("488b0500100000", B, "RIP-relative"),
    ("890500e0ffff", B, "RIP-relative"),
    ("488d0500100000", B, "RIP-relative"),
    ("0f1005f0ffffff", B, "RIP-relative"),      # movups xmm0,[rip-0x10]
    ("c5fc1000", B, None),                      # vmovups ymm0,[rax]
    ("62f17c481000", B, None),                  # vmovups zmm0,[rax]
    ("a4", B, None),                            # movsb without rep
    ("9c", B, None),                            # pushfq
    ("9d", B, None),                            # popfq
    ("c9", B, None),                            # leave
    ("c8080000", B, None),                      # enter 8,0
    ("f390", B, None),                          # pause
    ("0fa2", B, None),                          # cpuid
    ("0f31", B, None),                          # rdtsc
    ("64488b042528000000", B, None),            # mov rax,fs:[0x28]: stack protector
    ("65488b042500000000", B, None),            # gs-relative
    ("f30fbcc0", B, None),                      # tzcnt: f3 is mandatory, not rep
    ("d8c1", B, None),                          # fadd st,st(1)
    ("0f1800", B, None),                        # prefetchnta
    ("48f7f1", B, None),                        # div rcx
    ("0f01d6", B, None),                        # xtest
    ("0fc7f0", B, None),                        # rdrand eax
    ("9b", B, None),                            # fwait
]


@pytest.mark.parametrize("hexcode,kind,reason_word", TABLE, ids=[t[0] for t in TABLE])
def test_table(hexcode, kind, reason_word):
    insn = one(bytes.fromhex(hexcode))
    verdict = classify(insn)
    assert isinstance(verdict, Classification)
    assert verdict.kind is kind, (insn.text, verdict)
    assert verdict.reason
    if reason_word:
        assert reason_word.lower() in verdict.reason.lower(), (insn.text, verdict.reason)


def test_every_jcc_rel8_and_rel32_is_emulated():
    for opcode in range(16):
        for code in (bytes((0x70 + opcode, 0x10)), bytes((0x0F, 0x80 + opcode)) + (0x100).to_bytes(4, "little")):
            verdict = classify(one(code))
            assert verdict.kind is E and "conditional" in verdict.reason


def test_non_boost_reasons_are_distinct_per_rule():
    reasons = {}
    for hexcode, kind, _ in TABLE:
        verdict = classify(one(bytes.fromhex(hexcode)))
        if kind is not B:
            reasons.setdefault(verdict.reason, set()).add(kind)
    assert all(len(kinds) == 1 for kinds in reasons.values())
    assert len(reasons) >= 25


def test_only_what_is_cheaper_than_a_boost_is_emulated():
    # Emulated: RIP-only effects (jmp, jcc, nop) and call rel32, which cannot run as a copy.
    # push reg and ret would cost GETREGS + a memory access + SETREGS per hit: boosted.
    assert EMULATED_CODES == JMP_REL_CODES | JCC_CODES | CALL_REL_CODES | NOP_CODES
    for code in (Code.PUSH_R64, Code.RETNQ, Code.RETNQ_IMM16, Code.POP_R64):
        assert code not in EMULATED_CODES


def test_kind_values():
    assert [k.value for k in Kind] == ["refused", "emulated", "stepped", "boosted"]
    assert Kind.BOOST == "boosted"


# --- encodings produced by iced's own assembler -------------------------------

def test_assembled_rip_relative_load_boosts():
    mov = Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RAX,
                                     MemoryOperand(Register.RIP, displ=HIGH + 0x2000))
    insn = one(assemble(mov))
    assert insn.instruction.is_ip_rel_memory_operand
    assert insn.instruction.ip_rel_memory_address == HIGH + 0x2000
    assert classify(insn).kind is B


def test_assembled_calls_are_never_boosted():
    direct = Instruction.create_branch(Code.CALL_REL32_64, HIGH + 0x400)
    by_reg = Instruction.create_reg(Code.CALL_RM64, Register.RAX)
    by_mem = Instruction.create_mem(Code.CALL_RM64, MemoryOperand(Register.RIP, displ=HIGH + 0x3000))
    far = Instruction.create_mem(Code.CALL_M1664, MemoryOperand(Register.RSP))
    kinds = [classify(one(assemble(i))).kind for i in (direct, by_reg, by_mem, far)]
    assert kinds == [E, S, S, R]


def test_assembled_push_pop_forms():
    cases = [
        (Instruction.create_reg(Code.PUSH_R64, Register.R12), B),
        (Instruction.create_reg(Code.POP_R64, Register.R12), B),
        (Instruction.create_i32(Code.PUSHQ_IMM32, 0x12345), B),
        (Instruction.create_mem(Code.PUSH_RM64, MemoryOperand(Register.RBP, displ=-8)), B),
    ]
    for instruction, kind in cases:
        assert classify(one(assemble(instruction))).kind is kind


def test_legacy_prefixes():
    assert legacy_prefixes(bytes.fromhex("662e0f1f840000000000")) == b"\x66\x2e"
    assert legacy_prefixes(bytes.fromhex("f0480fb10f")) == b"\xf0"
    assert legacy_prefixes(bytes.fromhex("4883c001")) == b""   # REX is not a legacy prefix
    assert legacy_prefixes(b"") == b""


def test_a_real_function_classifies_without_surprises():
    # A typical gcc -O2 function: endbr64; push rbx; mov rbx,rdi; call rel32;
    # test eax,eax; je; lea rax,[rip+x]; pop rbx; ret; cs nopw
    code = bytes.fromhex(
        "f30f1efa 53 4889fb e800000000 85c0 7405 488d05f0ffffff 5b c3 662e0f1f840000000000")
    kinds = [classify(i).kind for i in decode_function(code, 0x5555_5555_4000)]
    assert kinds == [E, B, B, E, B, E, B, B, B, E]
