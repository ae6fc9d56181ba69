"""System calls injected into the tracee: mmap near the main binary, munmap, memfd shared
memory, all on threads blocked in restartable system calls that must not notice."""
from __future__ import annotations

import mmap as _mmap
import os
import re

from pyprobes.symbols import main_module, read_maps
from pyprobes.tracee.syscalls import (MAP_SHARED, PROT_EXEC, PROT_READ, PROT_WRITE, ftruncate,
                                      inject_syscall, memfd_create, mmap, mmap_near, munmap)

from .conftest import expect_exit, pump

SYS_CLOSE = 3
SLEEP_SYSCALLS = {35, 230}  # nanosleep, clock_nanosleep
FUTEX = 202
PAGE = 4096
TWO_GIB = 1 << 31
MASK = (1 << 64) - 1
ERESTARTSYS = 512
ERESTART_RESTARTBLOCK = 516


def _syscall_of(pid: int, tid: int) -> int | None:
    """The system call TID is blocked in, from /proc (None if running)."""
    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
        first = f.read().split()[0]
    return None if first == "running" or first.startswith("-") else int(first)


def _start_sleeper(procs, fixture, ms: int):
    tracee, out = procs.spawn_tracee([fixture("tr_sleeper"), ms])
    tracee.thaw()
    m = pump(tracee, lambda: out.search(r"^ready (\d+)$"), output=out)
    sleeper = int(m[1])
    pump(tracee, lambda: _syscall_of(tracee.pid, sleeper) in SLEEP_SYSCALLS
         and _syscall_of(tracee.pid, tracee.pid) == FUTEX, output=out)
    return tracee, out, sleeper


def _free_hint_near(pid: int, anchor: int, length: int) -> int:
    """A page-aligned free range of LENGTH bytes below ANCHOR, well within 2 GiB of it."""
    maps = read_maps(pid)
    hint = (anchor - 16 * PAGE - length) & ~(PAGE - 1)
    while True:
        if not any(m.start < hint + length and hint < m.end for m in maps):
            return hint
        hint -= 16 * PAGE
        assert anchor - hint < TWO_GIB // 2, "no free range near the binary"


def _maps_line(pid: int, address: int):
    for m in read_maps(pid):
        if m.start == address:
            return m
    return None


def _check_sleep_output(text: str, ms: int) -> None:
    m = re.search(r"^slept (\d+) requested (\d+) rc (\d+)$", text, re.M)
    assert m, text
    slept, requested, rc = int(m[1]), int(m[2]), int(m[3])
    assert requested == ms * 1_000_000
    assert rc == 0, "nanosleep failed after the injection"
    assert slept >= requested, f"slept {slept} ns of {requested}"
    assert text.rstrip().endswith("done")


def test_mmap_near_binary_and_munmap_while_threads_sleep(procs, fixture):
    ms = 1500
    tracee, out, sleeper = _start_sleeper(procs, fixture, ms)
    snap = tracee.freeze()
    assert snap.tids == {tracee.pid, sleeper}
    saved = {tid: regs.as_dict() for tid, regs in snap.regs.items()}
    # The sleeper is stopped inside its (restartable) sleep: the registers say so.
    assert snap.regs[sleeper].orig_rax in SLEEP_SYSCALLS
    assert snap.regs[sleeper].rax == (-ERESTART_RESTARTBLOCK) & MASK
    assert snap.regs[tracee.pid].orig_rax == FUTEX
    assert snap.regs[tracee.pid].rax == (-ERESTARTSYS) & MASK

    mod = main_module(tracee.pid)
    length = 2 * PAGE
    hint = _free_hint_near(tracee.pid, mod.base, length)
    assert abs(mod.base - hint) < TWO_GIB
    address = mmap_near(tracee, sleeper, hint, length, PROT_READ | PROT_EXEC)
    assert address == hint
    m = _maps_line(tracee.pid, hint)
    assert m is not None and m.end == hint + length and m.perms == "r-xp", m
    assert tracee.memory.read(hint, 16) == bytes(16)

    # Unmap it from the other thread, blocked in futex (pthread_join).
    munmap(tracee, tracee.pid, hint, length)
    assert _maps_line(tracee.pid, hint) is None
    # Both threads' registers are exactly as they were.
    for tid in (sleeper, tracee.pid):
        assert tracee.get_regs(tid).as_dict() == saved[tid]

    tracee.thaw()
    assert expect_exit(tracee) == 0
    _check_sleep_output(out.read_to_eof(), ms)


def test_memfd_shared_memory_with_the_tracer(procs, fixture):
    ms = 800
    tracee, out, sleeper = _start_sleeper(procs, fixture, ms)
    tracee.freeze()
    saved = tracee.get_regs(sleeper).as_dict()
    fd = memfd_create(tracee, sleeper, "pyprobes-test")
    assert fd >= 3
    assert os.readlink(f"/proc/{tracee.pid}/fd/{fd}").startswith("/memfd:pyprobes-test")
    ftruncate(tracee, sleeper, fd, PAGE)
    address = mmap(tracee, sleeper, 0, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    m = _maps_line(tracee.pid, address)
    assert m is not None and m.perms == "rw-s" and "memfd:pyprobes-test" in m.path, m

    mine = os.open(f"/proc/{tracee.pid}/fd/{fd}", os.O_RDWR)
    try:
        assert os.fstat(mine).st_size == PAGE
        # Our writes through the file appear in the tracee's memory...
        os.pwrite(mine, b"written by the tracer", 100)
        assert tracee.memory.read(address + 100, 21) == b"written by the tracer"
        # ...so do writes through our own mapping of it...
        with _mmap.mmap(mine, PAGE) as view:
            view[200:204] = b"\x01\x02\x03\x04"
            assert tracee.memory.read_u64(address + 200) == 0x04030201
            # ...and the tracee's memory is what we read.
            tracee.memory.write(address + 300, b"from the tracee side")
            assert view[300:320] == b"from the tracee side"
    finally:
        os.close(mine)

    munmap(tracee, sleeper, address, PAGE)
    assert _maps_line(tracee.pid, address) is None
    assert inject_syscall(tracee, sleeper, SYS_CLOSE, fd) == 0
    assert not os.path.exists(f"/proc/{tracee.pid}/fd/{fd}")
    assert tracee.get_regs(sleeper).as_dict() == saved

    tracee.thaw()
    assert expect_exit(tracee) == 0
    _check_sleep_output(out.read_to_eof(), ms)
