"""What a thread's seccomp state would do to a system call we are about to inject into it.

An injected system call is a real one, made by the tracee's thread: seccomp judges it like any
other. Strict mode (Seccomp: 1 in /proc/PID/status) lets only read, write, exit and rt_sigreturn
through and SIGKILLs the process on anything else; a filter (Seccomp: 2) may kill, raise SIGSYS,
fail the call or hand it to a supervisor. So before injecting, the tracee layer asks here:
strict mode is answered from its fixed list; filters are read back with
PTRACE_SECCOMP_GET_FILTER (CAP_SYS_ADMIN) and run, as the kernel would, on the exact
struct seccomp_data of the call. Anything but ALLOW or LOG refuses the injection
(SyscallRefused), before a register of the thread is touched.

The interpreter covers exactly what the kernel's seccomp_check_filter() accepts of classic BPF:
32-bit loads from seccomp_data, immediates, the scratch memory, ALU, jumps, TAX/TXA and RET.
"""
from __future__ import annotations

import errno
import os
import struct
from typing import Sequence

from . import ptrace
from .errors import SyscallRefused, TraceeError

AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_DATA_SIZE = 64  # int nr; u32 arch; u64 instruction_pointer; u64 args[6]

MODE_DISABLED, MODE_STRICT, MODE_FILTER = 0, 1, 2

# Return actions (linux/seccomp.h), most restrictive first.
RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
RET_ACTION_FULL = 0xFFFF0000
RET_DATA = 0x0000FFFF

# What strict mode lets through (x86-64 numbers): read, write, exit, rt_sigreturn.
STRICT_ALLOWED = frozenset({0, 1, 60, 15})

SYSCALL_NAMES = {0: "read", 1: "write", 9: "mmap", 10: "mprotect", 11: "munmap", 15: "rt_sigreturn",
                 39: "getpid", 60: "exit", 77: "ftruncate", 319: "memfd_create"}

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF

Instruction = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k


class FilterError(TraceeError, ValueError):
    """A program the kernel would never have accepted (seccomp_check_filter rejects it)."""


def mode_of(pid: int, tid: int) -> int:
    """Thread TID's seccomp mode: the Seccomp: line of its /proc status (0 if none)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Seccomp:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return MODE_DISABLED


def seccomp_data(nr: int, args: Sequence[int], instruction_pointer: int, arch: int = AUDIT_ARCH_X86_64) -> bytes:
    """struct seccomp_data as the kernel fills it for a system call (missing arguments are 0)."""
    full = [a & _MASK64 for a in args] + [0] * (6 - len(args))
    return struct.pack("<iIQ6Q", nr, arch, instruction_pointer & _MASK64, *full)


def parse_program(raw: bytes) -> list[Instruction]:
    """struct sock_filter[] bytes -> instructions."""
    return [struct.unpack_from("<HBBI", raw, i) for i in range(0, len(raw) - len(raw) % 8, 8)]


def run_filter(program: Sequence[Instruction], data: bytes) -> int:
    """Run one classic-BPF seccomp program on DATA (a struct seccomp_data); its 32-bit return value."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    n = len(program)
    while 0 <= pc < n:
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00 or cls == 0x01:  # LD, LDX
            mode = code & 0xE0
            if mode == 0x00:      # IMM
                value = k
            elif mode == 0x20 and cls == 0x00 and code & 0x18 == 0:  # W ABS
                if k % 4 or k + 4 > len(data):
                    raise FilterError(f"load at offset {k} outside struct seccomp_data")
                value = struct.unpack_from("<I", data, k)[0]
            elif mode == 0x60:    # MEM
                value = mem[_slot(k)]
            elif mode == 0x80:    # LEN
                value = SECCOMP_DATA_SIZE
            else:
                raise FilterError(f"instruction {code:#06x} is not allowed in a seccomp filter")
            if cls == 0x00:
                a = value
            else:
                x = value
        elif cls == 0x02:         # ST
            mem[_slot(k)] = a
        elif cls == 0x03:         # STX
            mem[_slot(k)] = x
        elif cls == 0x04:         # ALU
            operand = x if code & 0x08 else k
            a = _alu(code & 0xF0, a, operand)
            if a is None:         # division by zero: the program ends, returning 0
                return 0
        elif cls == 0x05:         # JMP
            op = code & 0xF0
            if op == 0x00:        # JA
                pc += k
                continue
            operand = x if code & 0x08 else k
            if op == 0x10:
                taken = a == operand
            elif op == 0x20:
                taken = a > operand
            elif op == 0x30:
                taken = a >= operand
            elif op == 0x40:
                taken = bool(a & operand)
            else:
                raise FilterError(f"jump {code:#06x} is not allowed in a seccomp filter")
            pc += jt if taken else jf
        elif cls == 0x06:         # RET
            source = code & 0x18
            if source == 0x00:
                return k & _MASK32
            if source == 0x10:
                return a
            raise FilterError(f"return {code:#06x} is not allowed in a seccomp filter")
        else:                     # MISC
            if code & 0xF8 == 0x00:
                x = a             # TAX
            elif code & 0xF8 == 0x80:
                a = x             # TXA
            else:
                raise FilterError(f"instruction {code:#06x} is not allowed in a seccomp filter")
    raise FilterError("the program runs past its end without returning")


def _slot(k: int) -> int:
    if k >= 16:
        raise FilterError(f"scratch memory slot {k} does not exist")
    return k


def _alu(op: int, a: int, v: int) -> int | None:
    if op == 0x00:
        r = a + v
    elif op == 0x10:
        r = a - v
    elif op == 0x20:
        r = a * v
    elif op == 0x30:
        if v == 0:
            return None
        r = a // v
    elif op == 0x40:
        r = a | v
    elif op == 0x50:
        r = a & v
    elif op == 0x60:
        r = a << (v & 31)
    elif op == 0x70:
        r = a >> (v & 31)
    elif op == 0x80:
        r = -a
    elif op == 0x90:
        if v == 0:
            return None
        r = a % v
    elif op == 0xA0:
        r = a ^ v
    else:
        raise FilterError(f"ALU operation {op:#04x} is not allowed in a seccomp filter")
    return r & _MASK32


def _action(ret: int) -> int:
    """The action part of a return value, signed as the kernel compares it (KILL_PROCESS lowest)."""
    action = ret & RET_ACTION_FULL
    return action - (1 << 32) if action & 0x80000000 else action


def combined_verdict(programs: Sequence[Sequence[Instruction]], data: bytes) -> int:
    """The return value seccomp acts on when every program of PROGRAMS (newest first) runs on
    DATA: the most restrictive action wins, and among equals the newest filter's (seccomp(2))."""
    verdict = RET_ALLOW
    for program in programs:
        ret = run_filter(program, data)
        if _action(ret) < _action(verdict):
            verdict = ret
    return verdict


def describe(ret: int) -> str:
    """A filter's return value in words: 'kill-process', 'errno 1 (EPERM)', 'trap'..."""
    action, value = ret & RET_ACTION_FULL, ret & RET_DATA
    if action == RET_ERRNO:
        return f"errno {value} ({errno.errorcode.get(value, '?')})"
    names = {RET_KILL_PROCESS: "kill-process", RET_KILL_THREAD: "kill-thread", RET_TRAP: "trap (SIGSYS)",
             RET_USER_NOTIF: "user-notif (a supervisor decides)",
             RET_TRACE: "trace (fails with ENOSYS without a seccomp-tracing tracer)",
             RET_LOG: "log", RET_ALLOW: "allow"}
    return names.get(action, f"unknown action {ret:#x} (the kernel kills the process)")


def is_allowed(ret: int) -> bool:
    return ret & RET_ACTION_FULL in (RET_ALLOW, RET_LOG)


def read_filters(tid: int) -> list[list[Instruction]]:
    """Every seccomp filter of stopped thread TID, newest first (PTRACE_SECCOMP_GET_FILTER)."""
    programs = []
    while True:
        try:
            raw = ptrace.seccomp_get_filter(tid, len(programs))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return programs
            raise
        programs.append(parse_program(raw))


def check_syscall(pid: int, tid: int, number: int, args: Sequence[int], instruction_pointer: int) -> None:
    """Raise SyscallRefused unless thread TID's seccomp state lets system call NUMBER with ARGS,
    made from the syscall instruction ending at INSTRUCTION_POINTER, run as it is."""
    mode = mode_of(pid, tid)
    if mode == MODE_DISABLED:
        return
    name = SYSCALL_NAMES.get(number, f"system call {number}")
    if mode == MODE_STRICT:
        if number not in STRICT_ALLOWED:
            raise SyscallRefused(pid, tid, name, f"PID {pid} runs in seccomp strict mode")
        return
    try:
        programs = read_filters(tid)
    except OSError as e:
        how = ("reading them takes CAP_SYS_ADMIN" if e.errno in (errno.EACCES, errno.EPERM)
               else os.strerror(e.errno or 0))
        raise SyscallRefused(pid, tid, name, f"PID {pid} runs under seccomp filters pyprobes cannot "
                                             f"read ({how}), so {name} might kill it") from None
    data = seccomp_data(number, args, instruction_pointer)
    try:
        verdict = combined_verdict(programs, data)
    except FilterError as e:
        raise SyscallRefused(pid, tid, name, f"PID {pid}'s seccomp filter cannot be evaluated ({e})") from None
    if not is_allowed(verdict):
        raise SyscallRefused(pid, tid, name, f"PID {pid}'s seccomp filter answers {name} with {describe(verdict)}")


__all__ = ["AUDIT_ARCH_X86_64", "FilterError", "MODE_DISABLED", "MODE_FILTER", "MODE_STRICT", "check_syscall",
           "combined_verdict", "describe", "is_allowed", "mode_of", "parse_program", "read_filters",
           "run_filter", "seccomp_data"]
