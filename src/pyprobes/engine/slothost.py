"""The slot cache's view of a traced process: pages mapped by injected mmap, freeze, migrate."""
from __future__ import annotations

import errno
import mmap as _mmap
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol, TypeVar

from ..slots import PAGE_SIZE, REACH, SlotMapError
from ..tracee import ProcessExited, SyscallRefused, ThreadState, Tracee
from ..tracee import syscalls
from ..tracee.maps import read_maps
from ..x86 import instruction_pointer
from .probe import ProbeError

# Room left free after the heap and below the stack, so slot pages never stop brk or the
# main stack from growing where the program expects them to.
HEAP_MARGIN = 1 << 30
STACK_MARGIN = 64 << 20
MAX_TRIES = 16
MAP_POPULATE = 0x8000
T = TypeVar("T")


def _gaps(pid: int) -> list[tuple[int, int]]:
    """Unmapped ranges of the address space (user half), minus the heap's and stack's growth room."""
    spans: list[tuple[int, int]] = []
    reserved: list[tuple[int, int]] = []
    for m in read_maps(pid):
        spans.append((m.start, m.end))
        if m.path == "[heap]":
            reserved.append((m.end, m.end + HEAP_MARGIN))
        elif m.path == "[stack]":
            reserved.append((m.start - STACK_MARGIN, m.start))
    spans.extend(reserved)
    spans.sort()
    gaps, cursor = [], 0x10000  # stay clear of mmap_min_addr
    for start, end in spans:
        if start > cursor:
            gaps.append((cursor, start))
        cursor = max(cursor, end)
    top = 0x7FFF_FFFF_F000
    if cursor < top:
        gaps.append((cursor, top))
    return gaps


def page_candidates(gaps: list[tuple[int, int]], near: int, size: int = PAGE_SIZE) -> list[int]:
    """Page addresses in free gaps within REACH of NEAR, nearest first, SIZE bytes free from each."""
    lo, hi = near - REACH + size, near + REACH - size
    candidates = []
    for start, end in gaps:
        start = max(start, lo)
        end = min(end, hi)
        start = (start + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if end - start < size:
            continue
        page = min(max(near & ~(PAGE_SIZE - 1), start), end - size)
        candidates.append(page)
    candidates.sort(key=lambda p: abs(p - near))
    return candidates


class SlotPagesRefused(SlotMapError, ProbeError):
    """The tracee's seccomp state forbids the mmap a slot page takes: every probe that needs a
    slot (or a return probe's trampoline) is refused, and only emulated probes can be placed.
    A ProbeError too, so whoever refuses an unplaceable probe refuses this one the same way."""


class SlotMigrator(Protocol):
    """What the slot host needs of the engine: which addresses are slots, and moving a stopped
    thread out of one (the engine knows which probe's copy a slot holds)."""

    def in_slot(self, address: int) -> bool: ...

    def migrate_out_of_slot(self, tid: int) -> None: ...


class TraceeSlotHost:
    """Implements slots.SlotHost for a live tracee; also maps the return-probe trampoline page."""

    def __init__(self, tracee: Tracee, migrator: SlotMigrator) -> None:
        self.tracee = tracee
        self.migrator = migrator

    def _injectable(self) -> int | None:
        """A stopped thread to inject into whose program counter is outside every slot, one with no event of
        its own to handle first if there is such. A signal that comes during the injection is
        held for the thread and delivered when it next runs on: never from inside a slot
        (invariant 2), where a thread held there, say, would be released."""
        fallback = None
        for t in self.tracee.threads.values():
            if t.state is not ThreadState.STOPPED or t.exiting or t.vfork_child:
                continue
            try:
                if self.migrator.in_slot(self.tracee.get_rip(t.tid)):
                    continue
            except OSError:
                continue
            if t.event_pending is None:
                return t.tid
            fallback = fallback or t.tid
        return fallback

    @contextmanager
    def _stopped_thread(self) -> Iterator[int]:
        """A stopped thread to inject into: one the tracer already holds, else freeze for the call."""
        tid = self._injectable()
        if tid is not None:
            yield tid
            return
        self.tracee.freeze()
        try:
            tid = self._injectable() or self.tracee.stopped_thread()
            if tid is None:  # every thread is past its exit event
                raise ProcessExited(self.tracee.pid, self.tracee.exit_code)
            yield tid
        finally:
            self.tracee.thaw()

    def inject(self, call: Callable[[int], T]) -> T:
        """CALL(tid) with a stopped thread to inject system calls into (the rescue handler's)."""
        with self._stopped_thread() as tid:
            return call(tid)

    def map_page(self, near: int, writable: bool = False) -> int:
        """An r-x page (a slot page) within REACH of NEAR; WRITABLE: an rw- page instead (the
        counters of a trampoline page)."""
        prot = syscalls.PROT_READ | (syscalls.PROT_WRITE if writable else syscalls.PROT_EXEC)
        with self._stopped_thread() as tid:
            for page in page_candidates(_gaps(self.tracee.pid), near)[:MAX_TRIES]:
                try:
                    return syscalls.mmap_near(self.tracee, tid, page, PAGE_SIZE, prot)
                except SyscallRefused as e:
                    # Seccomp would not let the mmap run: no page can come, at any address.
                    raise SlotPagesRefused(f"{e.reason}: pyprobes cannot map instruction slots in it; "
                                           "only emulated probes can be placed") from None
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOMEM, errno.EPERM):
                        raise
        raise SlotMapError(f"no free page within ±2 GiB of {near:#x} for instruction slots")

    def map_shared_page(self, near: int, name: str, size: int = PAGE_SIZE) -> tuple[int, _mmap.mmap]:
        """A rw- page (SIZE bytes: pages) within REACH of NEAR that the tracer maps too (a memfd
        the tracee keeps no descriptor of): the tracee's address, and the tracer's view, which
        outlives the tracee's mapping (an exec, the process's exit)."""
        with self._stopped_thread() as tid:
            try:
                fd = syscalls.memfd_create(self.tracee, tid, name)
            except SyscallRefused as e:
                raise SlotPagesRefused(f"{e.reason}: pyprobes cannot map counter pages in it; "
                                       "only emulated probes can be placed") from None
            try:
                syscalls.ftruncate(self.tracee, tid, fd, size)
                ours = os.open(f"/proc/{self.tracee.pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    view = _mmap.mmap(ours, size)
                finally:
                    os.close(ours)
                prot = syscalls.PROT_READ | syscalls.PROT_WRITE
                # populated: a record ring's pages are not faulted in one by one on the hit path
                flags = syscalls.MAP_SHARED | syscalls.MAP_FIXED_NOREPLACE | MAP_POPULATE
                for page in page_candidates(_gaps(self.tracee.pid), near, size)[:MAX_TRIES]:
                    try:
                        return syscalls.mmap(self.tracee, tid, page, size, prot, flags, fd), view
                    except OSError as e:
                        if e.errno not in (errno.EEXIST, errno.ENOMEM, errno.EPERM):
                            view.close()
                            raise
                view.close()
            finally:
                syscalls.close(self.tracee, tid, fd)
        raise SlotMapError(f"no free page within ±2 GiB of {near:#x} for counters")

    def map_shared_with_code(self, near: int, name: str, size: int) -> tuple[int, _mmap.mmap, int]:
        """map_shared_page(NEAR, NAME, SIZE) and an r-x page for the code that writes it: (the
        area's address, the tracer's view, the code page's address); both or neither."""
        area, view = self.map_shared_page(near, name, size)
        try:
            return area, view, self.map_page(near)
        except BaseException:
            view.close()
            self.unmap_page(area, size)
            raise

    def unmap_page(self, address: int, size: int = PAGE_SIZE) -> None:
        with self._stopped_thread() as tid:
            try:
                syscalls.munmap(self.tracee, tid, address, size)
            except SyscallRefused:
                pass  # a filter that lets mmap through but not munmap: the idle page stays, harmless

    def freeze_and_migrate(self, inside: Callable[[int], bool]) -> int:
        snapshot = self.tracee.freeze()
        migrated = 0
        for tid, regs in snapshot.regs.items():
            if inside(instruction_pointer(regs)):
                self.migrator.migrate_out_of_slot(tid)
                migrated += 1
        return migrated

    def thaw(self) -> None:
        self.tracee.thaw()
