"""record: the record and routine-calling trampolines and the shared record routine (x86/record.py).

Decoded at real high addresses (iced quietly uses absolute addressing for targets that fit 32
bits), and the routine also run here, in this process, against a ring in our own memory."""
from __future__ import annotations

import ctypes
import mmap

import pytest
from iced_x86 import Code, Decoder, Mnemonic, Register

from pyprobes.x86 import TRAMPOLINE_SLOT_SIZE, Region, find_region
from pyprobes.x86.decode import _FORMATTER
from pyprobes.x86.record import (HEAD_OFFSET, LOST_OFFSET, PROBE_ID_OFFSET, RECORD, RECORD_ACTION_ROUTINE_OFFSET,
                                 RECORD_SIZE, RING_HEADER_SIZE, TAIL_OFFSET, record_action_routine,
                                 record_action_trampoline, record_routine, routine_trampoline)

FUNC = 0x7F12_3400_1000
TRAMPOLINE = 0x7F12_3456_0000
COUNTER = TRAMPOLINE + 0x1000
POINTER = TRAMPOLINE + 0x1FF8
ROUTINE = 0x7F55_0000_0000
RING = 0x7F66_0000_0000


def decoded(code: bytes, ip: int) -> list:
    return list(Decoder(64, code, ip=ip))


def texts(code: bytes, ip: int) -> list[str]:
    return [_FORMATTER.format(i) for i in decoded(code, ip)]


def region_of(hexcode: str) -> Region:
    code = bytes.fromhex(hexcode.replace(" ", ""))
    region = find_region(code, FUNC, len(code), FUNC)
    assert isinstance(region, Region), region
    return region


def test_trampoline_counts_calls_the_routine_and_runs_the_region():
    region = region_of("f30f1efa 488d4701 4801f0 c3")  # endbr64; lea rax,[rdi+1]; add rax,rsi; ret
    t = routine_trampoline(region, TRAMPOLINE, COUNTER, POINTER, 7)
    assert texts(t.code, TRAMPOLINE) == [
        "lea rsp,[rsp-0x80]", "pushfq", f"lock inc qword ptr [{COUNTER:#x}]", "push r11",
        "mov r11d,7", f"call qword ptr [{POINTER:#x}]", "pop r11", "popfq", "lea rsp,[rsp+0x80]",
        "lea rax,[rdi+1]", "add rax,rsi", f"jmp {region.end:#x}"]
    insns = decoded(t.code, TRAMPOLINE)
    assert insns[2].has_lock_prefix and insns[2].is_ip_rel_memory_operand
    assert insns[5].is_ip_rel_memory_operand
    assert TRAMPOLINE + t.counted_offset == insns[7].ip  # the popfq: finish_action's point
    assert t.relocated == ((insns[9].ip, region.start), (insns[10].ip, region.start + 4))
    assert t.resume_address == region.end and t.return_jump == insns[11].ip


def test_the_longest_region_fits_a_slot():
    """A region is at most 4 + 15 bytes (an instruction starting at byte 4 may be 15 long);
    relocation keeps lengths, so the trampoline is its action + 19 + the jmp back."""
    region = region_of("488d4701 48818424 00010000 01000000 c3")  # lea; add qword [rsp+0x100],1
    assert region.length == 16
    t = routine_trampoline(region, TRAMPOLINE, COUNTER, POINTER, 0xFFFF_FFFF)
    assert len(t.code) - region.length + 4 + 15 <= TRAMPOLINE_SLOT_SIZE


def test_trampoline_refuses_what_it_cannot_encode():
    region = region_of("488d4701 4801f0 c3")
    with pytest.raises(ValueError):
        routine_trampoline(region, TRAMPOLINE, COUNTER, POINTER, 1 << 32)
    with pytest.raises(Exception, match="2 GiB"):
        routine_trampoline(region, TRAMPOLINE, COUNTER, TRAMPOLINE + (3 << 30), 1)


def test_routine_reserves_by_cmpxchg_and_publishes_last():
    code = record_routine(ROUTINE, RING, 4096)
    insns = decoded(code, ROUTINE)
    mnemonics = [i.mnemonic for i in insns]
    pushes = [i.op0_register for i in insns if i.mnemonic == Mnemonic.PUSH]
    pops = [i.op0_register for i in insns if i.mnemonic == Mnemonic.POP]
    assert pushes == [Register.R11, Register.RDX, Register.RAX, Register.R10] == pops[::-1]
    assert mnemonics[-1] == Mnemonic.RET
    assert any(i.code == Code.MOV_R64_IMM64 and i.immediate64 == RING for i in insns)
    (cas,) = [i for i in insns if i.mnemonic == Mnemonic.CMPXCHG]
    assert cas.has_lock_prefix and cas.memory_base == Register.R10 and cas.memory_displacement == HEAD_OFFSET
    (lost,) = [i for i in insns if i.mnemonic == Mnemonic.INC]
    assert lost.has_lock_prefix and lost.memory_displacement == LOST_OFFSET
    stores = [i for i in insns if i.mnemonic == Mnemonic.MOV and i.op0_kind != 0 and
              i.memory_base == Register.R11]
    assert stores[-1].memory_displacement == RING_HEADER_SIZE  # the commit word, last
    assert mnemonics.index(Mnemonic.RDTSC) < insns.index(stores[-1])
    with pytest.raises(ValueError):
        record_routine(ROUTINE, RING, 1000)


class LiveRing:
    """The routine run in this process: a ring in our memory, a wrapper taking the probe id."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ring = mmap.mmap(-1, RING_HEADER_SIZE + capacity * RECORD_SIZE)
        self.code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        ring = ctypes.addressof(ctypes.c_char.from_buffer(self.ring))
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.code))
        routine = base + 64
        # mov r11d, 9; call routine; ret (r11 is call-clobbered in the System V ABI)
        rel = routine - (base + 11)
        self.code[0:12] = bytes.fromhex("41bb09000000e8") + rel.to_bytes(4, "little", signed=True) + b"\xc3"
        self.code[64:64 + 300] = record_routine(routine, ring, capacity).ljust(300, b"\xcc")
        self.call = ctypes.CFUNCTYPE(None, *[ctypes.c_uint64] * 6)(base)

    def word(self, offset: int) -> int:
        return int.from_bytes(self.ring[offset:offset + 8], "little")

    def record(self, index: int) -> tuple:
        at = RING_HEADER_SIZE + (index % self.capacity) * RECORD_SIZE
        return RECORD.unpack_from(self.ring, at)


def test_routine_run_here_writes_records_and_drops_when_full():
    live = LiveRing(4)
    for i in range(1, 7):
        live.call(i, 2 * i, 3 * i, 4 * i, 5 * i, 6 * i)
    assert live.word(HEAD_OFFSET) == 4 and live.word(LOST_OFFSET) == 2
    tcb = None
    for index in range(4):
        commit, tsc, key, probe, *args = live.record(index)
        i = index + 1
        assert (commit, probe, args) == (index + 1, 9, [i, 2 * i, 3 * i, 4 * i, 5 * i, 6 * i])
        assert tsc > 0 and key != 0 and key == (tcb or key)
        tcb = key
    live.ring[TAIL_OFFSET:TAIL_OFFSET + 8] = (2).to_bytes(8, "little")  # the consumer took 2
    live.call(7, 14, 21, 28, 35, 42)
    assert live.word(HEAD_OFFSET) == 5 and live.record(4)[0] == 5 and live.record(4)[4] == 7


def test_action_trampoline_calls_the_action_routine_with_the_counter():
    region = region_of("f30f1efa 488d4701 4801f0 c3")
    t = record_action_trampoline(region, TRAMPOLINE, COUNTER, POINTER)
    assert texts(t.code, TRAMPOLINE) == [
        "lea rsp,[rsp-0x80]", "push r11", f"lea r11,[{COUNTER:#x}]", f"call qword ptr [{POINTER:#x}]",
        "pop r11", "lea rsp,[rsp+0x80]", "lea rax,[rdi+1]", "add rax,rsi", f"jmp {region.end:#x}"]
    assert t.counted_offset is None and t.flag_pushes == ()  # no popfq: stepped through
    longest = region_of("488d4701 48818424 00010000 01000000 c3")
    assert len(record_action_trampoline(longest, TRAMPOLINE, COUNTER, POINTER).code) \
        - longest.length + 4 + 15 <= TRAMPOLINE_SLOT_SIZE
    with pytest.raises(Exception, match="2 GiB"):
        record_action_trampoline(region, TRAMPOLINE, COUNTER, TRAMPOLINE + (3 << 30))


def test_action_routine_fits_before_its_offset():
    assert len(record_routine(ROUTINE, RING, 1 << 30)) <= RECORD_ACTION_ROUTINE_OFFSET


class LiveActionRing(LiveRing):
    """The action routine run here: r11 = a counter in our memory, its probe id PROBE_ID_OFFSET
    past it; the wrapper loads the flags from its 7th argument (popfq), calls the routine and
    returns the flags it then has."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.counters = mmap.mmap(-1, 4096)
        counter = ctypes.addressof(ctypes.c_char.from_buffer(self.counters))
        self.counters[PROBE_ID_OFFSET:PROBE_ID_OFFSET + 8] = (5).to_bytes(8, "little")
        ring = ctypes.addressof(ctypes.c_char.from_buffer(self.ring))
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.code))
        routine = base + 1024
        self.code[1024:1024 + 300] = record_action_routine(routine, ring, capacity).ljust(300, b"\xcc")
        # push rbx; mov rbx,[rsp+16] (the 7th argument: the flags wanted); push rbx; popfq;
        # mov r11, counter; call routine; pushfq; pop rax; pop rbx; ret
        head = bytes.fromhex("53 488b5c2410 53 9d 49bb").replace(b" ", b"") + counter.to_bytes(8, "little")
        code = head + b"\xe8"
        after = base + 512 + len(code) + 4
        code += (routine - after).to_bytes(4, "little", signed=True) + bytes.fromhex("9c585bc3")
        self.code[512:512 + len(code)] = code
        self.flagged = ctypes.CFUNCTYPE(ctypes.c_uint64, *[ctypes.c_uint64] * 7)(base + 512)

    def counter(self) -> int:
        return int.from_bytes(self.counters[0:8], "little")


STATUS_FLAGS = 0x8D5  # OF SF ZF AF PF CF


@pytest.mark.parametrize("flags", [0x202, 0x202 | STATUS_FLAGS, 0x202 | 0x800, 0x202 | 0x41, 0x202 | 0x94])
def test_action_routine_run_here_records_counts_drops_and_keeps_the_flags(flags):
    live = LiveActionRing(2)
    for i in range(1, 4):
        after = live.flagged(i, 2 * i, 3 * i, 4 * i, 5 * i, 6 * i, flags)
        assert after & (STATUS_FLAGS | 0x400) == flags & (STATUS_FLAGS | 0x400)
    assert live.counter() == 1  # the dropped hit: the others are records
    assert live.word(HEAD_OFFSET) == 2 and live.word(LOST_OFFSET) == 1
    for index in range(2):
        commit, tsc, key, probe, *args = live.record(index)
        i = index + 1
        assert (commit, probe, args) == (i, 5, [i, 2 * i, 3 * i, 4 * i, 5 * i, 6 * i]) and tsc > 0
