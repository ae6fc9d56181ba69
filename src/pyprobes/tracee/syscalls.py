"""System calls run inside the tracee, on one of its stopped threads.

The thread's registers are saved, pointed at a `syscall` instruction already present in its
text, single-stepped over it, and restored. orig_rax is set to -1 first: a thread stopped
inside a restartable system call (nanosleep, read...) would otherwise have the kernel's
restart logic rewind the registers we set; with the originals restored afterwards, the
kernel restarts the thread's own system call as if nothing had happened.
"""
from __future__ import annotations

import os

from .process import Tracee
from .seccomp import check_syscall

SYS_CLOSE = 3
SYS_MMAP = 9
SYS_MPROTECT = 10
SYS_MUNMAP = 11
SYS_RT_SIGACTION = 13
SYS_FTRUNCATE = 77
SYS_GETPID = 39
SYS_MEMFD_CREATE = 319

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MAP_FIXED_NOREPLACE = 0x100000
MFD_CLOEXEC = 1

RED_ZONE = 128
SYSCALL_INSN_LENGTH = 2  # 0f 05: seccomp sees the address after it
_MASK = 0xFFFFFFFFFFFFFFFF


def inject_syscall(tracee: Tracee, tid: int, number: int, *args: int) -> int:
    """Run system call NUMBER with ARGS on stopped thread TID; return its raw result (negative errno on failure).
    Raises SyscallRefused, touching nothing, if the thread's seccomp state would not let it run."""
    if len(args) > 6:
        raise ValueError("a system call takes at most 6 arguments")
    insn = tracee.syscall_instruction()
    # Seccomp judges an injected call like the thread's own: one it would not let through is
    # refused here (SyscallRefused), before anything of the thread changes.
    check_syscall(tracee.pid, tid, number, args, insn + SYSCALL_INSN_LENGTH)
    saved = tracee.get_regs(tid)
    regs = saved.copy()
    regs.rax = number
    regs.orig_rax = _MASK  # -1: no system call to restart
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, value & _MASK)
    regs.rip = insn
    # The thread's own stop (a breakpoint hit or a signal not yet handled) outlives the
    # injection: its registers come back below, and its event must not be consumed by our step.
    thread = tracee.threads[tid]
    owed, thread.event_pending = thread.event_pending, None
    try:
        # A thread stopped inside a system call (the exec stop, say) finishes that call first,
        # which writes its result over our rax, and reports the step trap before running
        # anything: the call has run only once RIP is past the instruction.
        for _ in range(3):
            tracee.set_regs(tid, regs)
            tracee.step(tid)
            after = tracee.get_regs(tid)
            if after.rip != insn:
                break
        else:
            raise OSError(5, f"the injected system call {number} did not run on thread {tid}")
        result = after.rax
    finally:
        if tid in tracee.threads:
            tracee.set_regs(tid, saved)
            thread.event_pending = owed
    return result - (1 << 64) if result >= 1 << 63 else result


def _check(result: int, what: str) -> int:
    if -4096 < result < 0:
        raise OSError(-result, f"{what} in the tracee: {os.strerror(-result)}")
    return result


def mmap(tracee: Tracee, tid: int, address: int, length: int, prot: int, flags: int,
         fd: int = -1, offset: int = 0) -> int:
    return _check(inject_syscall(tracee, tid, SYS_MMAP, address, length, prot, flags, fd, offset), "mmap")


def mmap_near(tracee: Tracee, tid: int, hint: int, length: int, prot: int) -> int:
    """An anonymous private mapping exactly at HINT, never replacing what is there (MAP_FIXED_NOREPLACE)."""
    return mmap(tracee, tid, hint, length, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)


def munmap(tracee: Tracee, tid: int, address: int, length: int) -> None:
    _check(inject_syscall(tracee, tid, SYS_MUNMAP, address, length), "munmap")


def mprotect(tracee: Tracee, tid: int, address: int, length: int, prot: int) -> None:
    _check(inject_syscall(tracee, tid, SYS_MPROTECT, address, length, prot), "mprotect")


def rt_sigaction(tracee: Tracee, tid: int, signal: int, action: int, old_action: int) -> None:
    """Set SIGNAL's disposition to the struct sigaction at ACTION (0: leave it), the old one
    written at OLD_ACTION (0: not wanted). Both live in tracee memory: nothing is put on its stack."""
    _check(inject_syscall(tracee, tid, SYS_RT_SIGACTION, signal, action, old_action, 8), "rt_sigaction")


def close(tracee: Tracee, tid: int, fd: int) -> None:
    _check(inject_syscall(tracee, tid, SYS_CLOSE, fd), "close")


def ftruncate(tracee: Tracee, tid: int, fd: int, length: int) -> None:
    _check(inject_syscall(tracee, tid, SYS_FTRUNCATE, fd, length), "ftruncate")


def memfd_create(tracee: Tracee, tid: int, name: str, flags: int = MFD_CLOEXEC) -> int:
    """Create a memfd in the tracee; its name is written on the thread's stack below the red zone."""
    raw = name.encode() + b"\0"
    rsp = tracee.get_regs(tid).rsp
    where = (rsp - RED_ZONE - len(raw)) & ~0xF
    saved = tracee.memory.read(where, len(raw))
    tracee.memory.write(where, raw)
    try:
        return _check(inject_syscall(tracee, tid, SYS_MEMFD_CREATE, where, flags), "memfd_create")
    finally:
        tracee.memory.write(where, saved)


__all__ = ["inject_syscall", "close", "mmap", "mmap_near", "munmap", "mprotect", "ftruncate", "memfd_create",
           "rt_sigaction",
           "PROT_READ", "PROT_WRITE", "PROT_EXEC", "MAP_SHARED", "MAP_PRIVATE", "MAP_ANONYMOUS",
           "MAP_FIXED_NOREPLACE"]
