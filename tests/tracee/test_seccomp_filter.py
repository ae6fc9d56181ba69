"""The classic-BPF interpreter that judges an injected system call as the thread's seccomp
filters would (tracee/seccomp.py), on filters built by hand: loads from struct seccomp_data,
ALU, jumps, scratch memory, the precedence of several filters' verdicts, and what the kernel's
checker would have refused. No process: these run in microseconds."""
from __future__ import annotations

import struct

import pytest

from pyprobes.tracee.seccomp import (AUDIT_ARCH_X86_64, RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS, RET_KILL_THREAD,
                                     RET_LOG, RET_TRACE, RET_TRAP, RET_USER_NOTIF, FilterError, combined_verdict,
                                     describe, is_allowed, parse_program, run_filter, seccomp_data)

# Opcodes (linux/bpf_common.h), spelled out so a test does not lean on the interpreter's own.
LD_W_ABS, LD_IMM, LDX_IMM, LD_MEM, LDX_MEM, ST, STX, LD_LEN = 0x20, 0x00, 0x01, 0x60, 0x61, 0x02, 0x03, 0x80
LDX_W_ABS = 0x21
ADD_K, SUB_K, MUL_K, DIV_X, OR_K, AND_K, LSH_K, RSH_K, NEG, MOD_K, XOR_K, ADD_X = (
    0x04, 0x14, 0x24, 0x3C, 0x44, 0x54, 0x64, 0x74, 0x84, 0x94, 0xA4, 0x0C)
JA, JEQ_K, JGT_K, JGE_K, JSET_K, JEQ_X = 0x05, 0x15, 0x25, 0x35, 0x45, 0x1D
RET_K, RET_A = 0x06, 0x16
TAX, TXA = 0x07, 0x87

NR, ARCH, IP_LO, IP_HI = 0, 4, 8, 12
MMAP, MUNMAP, GETPID = 9, 11, 39
PROT_EXEC = 4


def arg_lo(i: int) -> int:
    return 16 + 8 * i


def stmt(code: int, k: int = 0) -> tuple[int, int, int, int]:
    return (code, 0, 0, k)


def jump(code: int, k: int, jt: int, jf: int) -> tuple[int, int, int, int]:
    return (code, jt, jf, k)


def on_nr(nr: int, action: int) -> list:
    return [stmt(LD_W_ABS, NR), jump(JEQ_K, nr, 0, 1), stmt(RET_K, action), stmt(RET_K, RET_ALLOW)]


def data(nr: int, *args: int, ip: int = 0x401002, arch: int = AUDIT_ARCH_X86_64) -> bytes:
    return seccomp_data(nr, args, ip, arch)


def test_seccomp_data_layout():
    raw = data(MMAP, 0x1122334455667788, 2, ip=0xAABBCCDD00112233)
    assert len(raw) == 64
    assert struct.unpack_from("<iI", raw) == (MMAP, AUDIT_ARCH_X86_64)
    assert struct.unpack_from("<II", raw, IP_LO) == (0x00112233, 0xAABBCCDD)
    assert struct.unpack_from("<II", raw, arg_lo(0)) == (0x55667788, 0x11223344)
    assert struct.unpack_from("<Q", raw, arg_lo(5)) == (0,)
    assert struct.unpack_from("<Q", data(MMAP, -1), arg_lo(0)) == (2**64 - 1,)  # -1 as the kernel sees it


def test_a_syscall_named_by_number():
    program = on_nr(MMAP, RET_KILL_PROCESS)
    assert run_filter(program, data(MMAP)) == RET_KILL_PROCESS
    assert run_filter(program, data(MUNMAP)) == RET_ALLOW


def test_the_arch_check_of_every_real_filter():
    program = [stmt(LD_W_ABS, ARCH), jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0), stmt(RET_K, RET_KILL_PROCESS),
               *on_nr(GETPID, RET_ERRNO | 1)]
    assert run_filter(program, data(MMAP)) == RET_ALLOW
    assert run_filter(program, data(GETPID)) == RET_ERRNO | 1
    assert run_filter(program, data(MMAP, arch=0x40000003)) == RET_KILL_PROCESS  # i386


def test_an_argument_decides_w_xor_x():
    """mmap with PROT_EXEC killed, other mmaps allowed: the verdict depends on the exact args."""
    program = [stmt(LD_W_ABS, NR), jump(JEQ_K, MMAP, 0, 3),
               stmt(LD_W_ABS, arg_lo(2)), jump(JSET_K, PROT_EXEC, 0, 1),
               stmt(RET_K, RET_KILL_PROCESS), stmt(RET_K, RET_ALLOW)]
    assert run_filter(program, data(MMAP, 0, 4096, 5, 0x22)) == RET_KILL_PROCESS
    assert run_filter(program, data(MMAP, 0, 4096, 3, 0x22)) == RET_ALLOW


def test_the_high_half_of_an_argument_and_the_instruction_pointer():
    program = [stmt(LD_W_ABS, arg_lo(0) + 4), jump(JEQ_K, 0x7FFF, 0, 1), stmt(RET_K, RET_TRAP),
               stmt(LD_W_ABS, IP_LO), jump(JGE_K, 0x500000, 0, 1), stmt(RET_K, RET_ERRNO | 13),
               stmt(RET_K, RET_ALLOW)]
    assert run_filter(program, data(MMAP, 0x7FFF_0000_1000)) == RET_TRAP
    assert run_filter(program, data(MMAP, 0x1000, ip=0x600000)) == RET_ERRNO | 13
    assert run_filter(program, data(MMAP, 0x1000, ip=0x400000)) == RET_ALLOW


def test_alu_scratch_memory_and_registers():
    program = [stmt(LD_IMM, 7), stmt(ADD_K, 5), stmt(MUL_K, 3), stmt(SUB_K, 6),   # 30
               stmt(OR_K, 0x100), stmt(AND_K, 0x1FF), stmt(XOR_K, 0x1),           # 0x11f
               stmt(LSH_K, 4), stmt(RSH_K, 2), stmt(MOD_K, 1000),                 # 0x47c % 1000 = 148
               stmt(ST, 3), stmt(LDX_IMM, 2), stmt(LD_MEM, 3), stmt(ADD_X),       # 150
               stmt(TAX), stmt(LD_IMM, 0), stmt(TXA), stmt(STX, 15), stmt(LDX_MEM, 15),
               jump(JEQ_X, 0, 1, 0), stmt(RET_K, RET_KILL_PROCESS),
               stmt(LD_LEN), jump(JEQ_K, 64, 1, 0), stmt(RET_K, RET_KILL_PROCESS),
               stmt(LD_MEM, 3), stmt(NEG), jump(JGT_K, 0x80000000, 0, 1),
               stmt(RET_A)]
    assert run_filter(program, data(GETPID)) == (-148) & 0xFFFFFFFF  # NEG of scratch word 3


def test_ja_and_ret_a():
    program = [stmt(LD_IMM, RET_ERRNO | 22), (JA, 0, 0, 1), stmt(RET_K, RET_KILL_PROCESS), stmt(RET_A)]
    assert run_filter(program, data(GETPID)) == RET_ERRNO | 22


def test_division_by_zero_ends_the_program_with_0():
    program = [stmt(LDX_IMM, 0), stmt(LD_IMM, 10), stmt(DIV_X), stmt(RET_K, RET_ALLOW)]
    assert run_filter(program, data(GETPID)) == RET_KILL_THREAD


@pytest.mark.parametrize("program", [
    [stmt(LD_W_ABS, 64), stmt(RET_K, RET_ALLOW)],        # past struct seccomp_data
    [stmt(LD_W_ABS, 2), stmt(RET_K, RET_ALLOW)],         # misaligned
    [stmt(LDX_W_ABS, 0), stmt(RET_K, RET_ALLOW)],        # LDX|ABS: not for seccomp
    [stmt(LD_MEM, 16), stmt(RET_K, RET_ALLOW)],          # scratch memory has 16 words
    [stmt(LD_IMM, 1)],                                   # falls off the end
    [(0x30, 0, 0, 0), stmt(RET_K, RET_ALLOW)],           # LD|B|ABS
])
def test_what_the_kernel_would_have_refused(program):
    with pytest.raises(FilterError):
        run_filter(program, data(GETPID))


def test_the_most_restrictive_filter_wins():
    allow = [stmt(RET_K, RET_ALLOW)]
    log = [stmt(RET_K, RET_LOG)]
    eperm = on_nr(MMAP, RET_ERRNO | 1)
    trap = on_nr(MMAP, RET_TRAP)
    kill_thread = on_nr(MMAP, RET_KILL_THREAD)
    kill_process = on_nr(MMAP, RET_KILL_PROCESS)
    mmap = data(MMAP)
    assert combined_verdict([], mmap) == RET_ALLOW
    assert combined_verdict([allow, log], mmap) == RET_LOG
    assert combined_verdict([allow, eperm, log], mmap) == RET_ERRNO | 1
    assert combined_verdict([eperm, trap], mmap) == RET_TRAP
    assert combined_verdict([trap, kill_thread], mmap) == RET_KILL_THREAD
    assert combined_verdict([kill_thread, kill_process, allow], mmap) == RET_KILL_PROCESS
    assert combined_verdict([on_nr(MMAP, RET_TRACE), on_nr(MMAP, RET_USER_NOTIF)], mmap) == RET_USER_NOTIF
    # Equal actions: the newest filter's (the first) return value, data and all.
    assert combined_verdict([on_nr(MMAP, RET_ERRNO | 13), eperm], mmap) == RET_ERRNO | 13
    assert combined_verdict([eperm, kill_process], data(MUNMAP)) == RET_ALLOW


def test_verdicts_in_words():
    assert describe(RET_KILL_PROCESS) == "kill-process"
    assert describe(RET_KILL_THREAD) == "kill-thread"
    assert describe(RET_ERRNO | 1) == "errno 1 (EPERM)"
    assert describe(RET_TRAP).startswith("trap")
    assert describe(RET_TRACE).startswith("trace")
    assert describe(RET_USER_NOTIF).startswith("user-notif")
    assert "kills" in describe(0x00010000)  # an action this kernel does not know: treated as kill
    assert is_allowed(RET_ALLOW) and is_allowed(RET_LOG | 5)
    assert not any(is_allowed(r) for r in (RET_KILL_PROCESS, RET_KILL_THREAD, RET_TRAP, RET_ERRNO,
                                            RET_USER_NOTIF, RET_TRACE))


def test_parse_program():
    raw = struct.pack("<HBBI", LD_W_ABS, 0, 0, NR) + struct.pack("<HBBI", JEQ_K, 1, 2, MMAP)
    assert parse_program(raw) == [(LD_W_ABS, 0, 0, NR), (JEQ_K, 1, 2, MMAP)]
