"""The freezer: stop every thread and account for each (freeze), let them go (thaw), and keep
single threads stopped across both (hold/release)."""
from __future__ import annotations

import errno
import os
import signal as _signal
from collections import deque
from dataclasses import dataclass, field

from . import ptrace
from .errors import ProcessExited
from .events import Event
from .procfs import pending_unblocked
from .ptrace import Regs
from .threads import StopKind, Thread, ThreadState

_SIGTRAP_BIT = 1 << (_signal.SIGTRAP - 1)


@dataclass
class Snapshot:
    """What freeze() saw: every thread's registers and every event that arrived while stopping."""

    regs: dict[int, Regs] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    @property
    def tids(self) -> set[int]:
        return set(self.regs)


class Freezer:
    """Tracee's freeze(), thaw(), hold() and release()."""

    # Of the Tracee this is part of (see Tracee.__init__):
    pid: int
    threads: dict[int, Thread]
    alive: bool
    exit_code: int | None
    _queue: deque[Event]
    _queue_all: bool
    _frozen: bool
    # and, from the other parts: _reap (loop.py), _handle (stops.py), _resume_quietly (signals.py).

    @property
    def frozen(self) -> bool:
        """Between freeze() and thaw()."""
        return self._frozen

    def freeze(self) -> Snapshot:
        """Stop every thread and account for each; events that arrive meanwhile are queued."""
        if not self.alive:
            raise ProcessExited(self.pid, self.exit_code)
        self._frozen = self._queue_all = True
        first_queued = len(self._queue)
        for t in list(self.threads.values()):
            if t.state in (ThreadState.RUNNING, ThreadState.LISTENING):
                try:
                    ptrace.interrupt(t.tid)
                except OSError as e:
                    if e.errno != errno.ESRCH:
                        raise
                    t.exiting = True
        while self.alive:
            waiting = [t for t in self.threads.values()
                       if t.state is not ThreadState.STOPPED and not t.exiting and not t.in_vfork]
            if not waiting:
                break
            tid, status = self._reap(block=True)
            if status == -1:
                break
            self._handle(tid, status)
        if not self.alive:
            self._frozen = self._queue_all = False
            raise ProcessExited(self.pid, self.exit_code)
        for tid in list(self.threads):
            self._report_pending_trap(tid)
        if not self.alive:
            self._frozen = self._queue_all = False
            raise ProcessExited(self.pid, self.exit_code)
        snapshot = Snapshot(events=list(self._queue)[first_queued:])
        for t in self.threads.values():
            if t.state is ThreadState.STOPPED:
                try:
                    snapshot.regs[t.tid] = ptrace.getregs(t.tid)
                except OSError:
                    t.exiting = True
        return snapshot

    def _report_pending_trap(self, tid: int) -> None:
        """Let a SIGTRAP that TID raised before the freeze's interrupt stopped it be reported now.

        An int3 or a finished single-step makes SIGTRAP pending; the kernel takes a pending
        interrupt before it dequeues signals, so the thread can stop for the freeze with its
        trap still unreported (SigPnd bit 5) and RIP past the int3. Left so, the trap reaches
        the program at the next resume after detach and kills it. Resumed, a thread with a
        synchronous signal pending dequeues it first and stops again before any instruction
        runs, so the trap becomes an ordinary queued event (breakpoint, step, or the
        program's own SIGTRAP) that every owner already handles, and the snapshot's RIP is
        the reported one."""
        for _ in range(8):  # each round is one stop: a group stop may come before the trap
            t = self.threads.get(tid)
            if t is None or t.state is not ThreadState.STOPPED or t.stop_kind is not StopKind.EVENT \
                    or t.event_pending is not None or t.exiting or t.held \
                    or not pending_unblocked(self.pid, tid) & _SIGTRAP_BIT:
                return
            self._resume_quietly(t)
            if t.state is not ThreadState.RUNNING:
                return  # listening in a group stop: the trap is reported when it resumes
            while t.state is not ThreadState.STOPPED and tid in self.threads and self.alive:
                try:
                    _, status = os.waitpid(tid, ptrace.WALL)
                except ChildProcessError:
                    return
                self._handle(tid, status)

    def thaw(self) -> None:
        """Resume every thread the freeze stopped; those with an unhandled event wait for it."""
        self._frozen = self._queue_all = False
        for t in list(self.threads.values()):
            if t.state is ThreadState.STOPPED and not t.event_pending and not t.held:
                self._resume_quietly(t)

    def hold(self, tid: int) -> None:
        """Keep TID stopped across thaw() and resume() until release()."""
        self.threads[tid].held = True

    def release(self, tid: int, resume: bool = True) -> None:
        """Undo hold(); the thread goes on now unless RESUME is false (or it has an event to handle)."""
        t = self.threads.get(tid)
        if t is None:
            return
        t.held = False
        if resume and t.state is ThreadState.STOPPED and not t.event_pending and not self._frozen:
            self._resume_quietly(t)
