"""emulate: the tracer's version of jmp/jcc/call/nop against references (push reg and ret are
boosted, not emulated: classify.py)."""
from __future__ import annotations

import ctypes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyprobes.x86.decode import decode_function
from pyprobes.x86.emulate import (
    CallRel,
    Emulation,
    Jcc,
    JmpRel,
    Nop,
    compile_emulation,
    condition_test,
)

ORIG = 0x7F12_3400_1000
MASK = (1 << 64) - 1


class UserRegs(ctypes.Structure):
    """struct user_regs_struct from <sys/user.h>, as ptrace(PTRACE_GETREGS) fills it."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
        "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
        "gs_base", "ds", "es", "fs", "gs")]


class FakeMemory:
    """Byte-addressed dict; reading an unwritten byte is an error, as a bad address would be."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}

    def read(self, address: int, size: int) -> bytes:
        return bytes(self.bytes[address + i] for i in range(size))

    def write(self, address: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bytes[address + i] = b

    def qword(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")


class NoMemory:
    def read(self, address, size):
        raise AssertionError("memory read by an emulation that needs none")

    def write(self, address, data):
        raise AssertionError("memory written by an emulation that needs none")


def one(hexcode: str, address: int = ORIG):
    insns = decode_function(bytes.fromhex(hexcode), address)
    assert len(insns) == 1
    return insns[0]


def regs(**values) -> UserRegs:
    r = UserRegs()
    r.rsp = 0x7FFD_0000_1000
    r.eflags = 0x202
    for name, value in values.items():
        setattr(r, name, value)
    return r


# --- jcc ----------------------------------------------------------------------

def reference_taken(opcode_low_nibble: int, eflags: int) -> bool:
    """Textbook jcc conditions (Intel SDM Jcc table), written independently."""
    cf = bool(eflags & 0x001)
    pf = bool(eflags & 0x004)
    zf = bool(eflags & 0x040)
    sf = bool(eflags & 0x080)
    of = bool(eflags & 0x800)
    table = [
        of,                        # jo
        not of,                    # jno
        cf,                        # jb / jc / jnae
        not cf,                    # jae / jnb / jnc
        zf,                        # je / jz
        not zf,                    # jne / jnz
        cf or zf,                  # jbe / jna
        not cf and not zf,         # ja / jnbe
        sf,                        # js
        not sf,                    # jns
        pf,                        # jp / jpe
        not pf,                    # jnp / jpo
        sf != of,                  # jl / jnge
        sf == of,                  # jge / jnl
        zf or sf != of,            # jle / jng
        not zf and sf == of,       # jg / jnle
    ]
    return table[opcode_low_nibble]


JCC_ENCODINGS = [(n, bytes((0x70 + n, 0x20)).hex(), 2, 0x20) for n in range(16)] + [
    (n, (bytes((0x0F, 0x80 + n)) + (-0x1000).to_bytes(4, "little", signed=True)).hex(), 6, -0x1000)
    for n in range(16)]


@settings(max_examples=60, deadline=None)
@given(eflags=st.integers(min_value=0, max_value=(1 << 22) - 1))
def test_every_jcc_against_the_reference(eflags):
    for nibble, hexcode, length, rel in JCC_ENCODINGS:
        emulation = compile_emulation(one(hexcode))
        assert isinstance(emulation, Jcc) and not emulation.needs_memory
        r = regs(eflags=eflags, rip=ORIG + 1)
        emulation.apply(r, NoMemory())
        expected = ORIG + length + rel if reference_taken(nibble, eflags) else ORIG + length
        assert emulation.taken(eflags) == reference_taken(nibble, eflags)
        assert condition_test(emulation.condition)(eflags) == reference_taken(nibble, eflags)
        assert r.rip == expected, (hexcode, hex(eflags))
        assert r.eflags == eflags and r.rsp == 0x7FFD_0000_1000


def test_jcc_sees_only_the_flag_bits():
    je = compile_emulation(one("7410"))
    for eflags, taken in [(0x40, True), (0x202, False), (0xFFFF_FFBF, False), (0x246, True)]:
        r = regs(eflags=eflags)
        je.apply(r, NoMemory())
        assert r.rip == (ORIG + 0x12 if taken else ORIG + 2)


# --- jmp / nop --------------------------------------------------------------------

@pytest.mark.parametrize("hexcode,target", [
    ("eb10", ORIG + 0x12), ("ebfe", ORIG), ("eb80", ORIG + 2 - 0x80),
    ("e900100000", ORIG + 5 + 0x1000), ("e9fbefffff", ORIG + 5 - 0x1005),
    ("f2e900000000", ORIG + 6)])
def test_jmp_targets(hexcode, target):
    emulation = compile_emulation(one(hexcode))
    assert isinstance(emulation, JmpRel) and not emulation.needs_memory
    r = regs(rip=ORIG + 1)
    emulation.apply(r, NoMemory())
    assert r.rip == target


@pytest.mark.parametrize("hexcode", [
    "90", "6690", "4890", "0f1f00", "0f1f4000", "0f1f440000", "660f1f440000", "0f1f8000000000",
    "0f1f840000000000", "660f1f840000000000", "662e0f1f840000000000", "f30f1efa", "f30f1efb"])
def test_nops_advance_rip(hexcode):
    emulation = compile_emulation(one(hexcode))
    assert isinstance(emulation, Nop) and not emulation.needs_memory
    before = regs(rip=ORIG + 1, rax=5)
    emulation.apply(before, NoMemory())
    assert before.rip == ORIG + len(bytes.fromhex(hexcode))
    assert before.rax == 5 and before.rsp == 0x7FFD_0000_1000


# --- call ------------------------------------------------------------------------

def test_call_pushes_the_original_return_address():
    call = one("e8fb0f0000")  # call ORIG+0x1000
    emulation = compile_emulation(call)
    assert isinstance(emulation, CallRel) and emulation.needs_memory
    memory = FakeMemory()
    r = regs(rip=ORIG + 1, rax=5)
    emulation.apply(r, memory)
    assert r.rip == ORIG + 0x1000
    assert r.rsp == 0x7FFD_0000_1000 - 8
    assert memory.qword(r.rsp) == ORIG + 5
    assert memory.read(r.rsp, 8) == (ORIG + 5).to_bytes(8, "little")
    assert r.rax == 5 and r.eflags == 0x202


def test_padded_tls_call():
    # gcc's general-dynamic TLS sequence pads the call with 66 66 48 (REX.W wins)
    call = one("666648e8fb0f0000")
    emulation = compile_emulation(call)
    memory = FakeMemory()
    r = regs()
    emulation.apply(r, memory)
    assert r.rip == ORIG + 8 + 0x0FFB
    assert memory.qword(r.rsp) == ORIG + 8


def test_call_writes_nothing_else():
    memory = FakeMemory()
    r = regs()
    compile_emulation(one("e800000000")).apply(r, memory)
    assert sorted(memory.bytes) == list(range(r.rsp, r.rsp + 8))


def test_failed_stack_write_leaves_registers_alone():
    class Unwritable(FakeMemory):
        def write(self, address, data):
            raise OSError(14, "Bad address")

    r = regs(rip=ORIG + 1)
    with pytest.raises(OSError):
        compile_emulation(one("e800000000")).apply(r, Unwritable())
    assert (r.rip, r.rsp) == (ORIG + 1, 0x7FFD_0000_1000)


def test_stack_pointer_wraps_at_64_bits():
    memory = FakeMemory()
    r = regs(rsp=0)
    compile_emulation(one("e800000000")).apply(r, memory)
    assert r.rsp == MASK - 7 and memory.qword(MASK - 7) == ORIG + 5


# --- what is not emulated ------------------------------------------------------

@pytest.mark.parametrize("hexcode", [
    "4883c001",      # add: boosted
    "ffd0",          # call rax: stepped
    "e2fe",          # loop: stepped
    "cc",            # int3: refused
    "66eb00",        # jmp with 66: refused although the opcode is emulatable
    "6650",          # push ax: not a 64-bit push
    "cb",            # far ret
    "50",            # push rax: boosted (cheaper than emulating)
    "4157",          # push r15: boosted
    "c3",            # ret: boosted
    "f3c3",          # rep ret: boosted
    "c20800",        # ret 8: boosted
])
def test_not_emulatable_raises(hexcode):
    with pytest.raises(ValueError, match="not emulated"):
        compile_emulation(one(hexcode))


def test_base_class():
    assert Emulation.needs_memory is False
    with pytest.raises(NotImplementedError):
        Emulation().apply(regs(), NoMemory())


def test_apply_works_with_a_plain_object_too():
    class Regs:
        pass

    r = Regs()
    r.rip, r.rsp, r.eflags, r.rdi = ORIG, 0x1000, 0x40, 42
    memory = FakeMemory()
    compile_emulation(one("e810000000")).apply(r, memory)
    assert memory.qword(0xFF8) == ORIG + 5 and r.rsp == 0xFF8 and r.rip == ORIG + 0x15
    assert r.rdi == 42


@pytest.mark.parametrize("hexcode, constant", [
    ("90", True),                    # nop
    ("f30f1efa", True),              # endbr64
    ("0f1f440000", True),            # nopl 0x0(%rax,%rax,1)
    ("eb10", True),                  # jmp rel8
    ("e900100000", True),            # jmp rel32
    ("7410", False),                 # je: depends on the flags
    ("e800100000", False),           # call: writes the return address
])
def test_constant_rip_is_the_whole_effect(hexcode, constant):
    """constant_rip lets the hit path make an emulation one POKEUSER of RIP: it must be set exactly
    when apply() does nothing but set RIP to that address."""
    em = compile_emulation(one(hexcode))
    if not constant:
        assert em.constant_rip is None
        return
    regs = UserRegs(rip=ORIG + 1, rsp=0x7FFF_0000_1000, eflags=0x246, rax=7)
    before = bytes(regs)
    em.apply(regs, NoMemory())
    assert regs.rip == em.constant_rip
    regs.rip = ORIG + 1
    assert bytes(regs) == before
