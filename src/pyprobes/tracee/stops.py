"""Stop decoding: one wait status in, the thread table brought up to date and an Event out.

Every stop of a traced thread comes through StopDecoder._handle. It returns None when nothing
is left for the owner: the layer dealt with the stop itself (a stale interrupt, a finished
vfork, a retired breakpoint's trap) or an owner's trap handler took it. An informational event
(clone, fork, group stop...; events.SELF_RESUMING) has its thread resumed here; every other
event leaves its thread stopped until the owner resumes it.

While `_queue_all` is set (between freeze() and thaw(), and while step() waits for its own
step), every event is also queued for the owner, the layer resumes no thread that stopped for
a reason of its own, and the trap handlers are not called.
"""
from __future__ import annotations

import os
import signal as _signal
from collections import Counter, deque
from typing import Callable

from . import procfs, ptrace
from .breakpoints import Breakpoints
from .events import Event, EventKind
from .threads import StopKind, Thread, ThreadState

STOP_SIGNALS = frozenset({_signal.SIGSTOP, _signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU})
_SIGTRAP = _signal.SIGTRAP
_TRAP_STOP = (_SIGTRAP << 8) | 0x7F  # the wait status of a SIGTRAP signal-delivery stop (no ptrace event)


def exit_code_of(status: int) -> int:
    """The exit code of a wait status, as subprocess reports it (-N for death by signal N)."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return -os.WTERMSIG(status)


class StopDecoder:
    """Tracee's _handle: what each stop means, by kind of stop and ptrace event."""

    # Of the Tracee this is part of (see Tracee.__init__):
    pid: int
    threads: dict[int, Thread]
    breakpoints: Breakpoints
    alive: bool
    exit_code: int | None
    breakpoint_handler: Callable[[int, int], None] | None
    vfork_handler: Callable[[int, bool], None] | None
    step_handler: Callable[[int], None] | None
    _queue: deque[Event]
    _queue_all: bool
    _early: dict[int, int]
    _wake_requested: bool
    signals_reported: Counter[int]
    thread_pointers: dict[int, int]
    thread_names: dict[int, str]
    # and, from the other parts: _resume_quietly (signals.py), _release_fork_child and
    # _after_exec (lifecycle.py).

    def _handle(self, tid: int, status: int) -> Event | None:
        """Account for one wait status; return the event for the owner, or None if handled here."""
        t = self.threads.get(tid)
        if status == _TRAP_STOP and t is not None:
            # Tested first: every probe hit and every finished single-step is one of these.
            t.state = ThreadState.STOPPED
            t.stop_kind = StopKind.SIGNAL
            return self._handle_sigtrap(t)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return self._exited(tid, t, status)
        if not os.WIFSTOPPED(status):
            return None
        if t is None:
            self._early[tid] = status  # a new thread's (or fork child's) stop before its parent's event
            return None
        if t.state is ThreadState.NEW and not t.vfork_child:
            try:
                self.thread_pointers[tid] = ptrace.getregs(tid).fs_base
            except OSError:
                pass  # killed meanwhile: it records nothing more
        t.state = ThreadState.STOPPED
        event = status >> 16
        if event == 0:
            t.stop_kind = StopKind.SIGNAL
            sig = os.WSTOPSIG(status)
            if sig == _SIGTRAP:
                return self._handle_sigtrap(t)
            self.signals_reported[sig] += 1
            return self._pending(t, Event(EventKind.SIGNAL, tid, signal=sig))
        t.stop_kind = StopKind.EVENT
        return _EVENT_STOPS.get(event, StopDecoder._unknown_event)(self, t, os.WSTOPSIG(status))

    def _handle_sigtrap(self, t: Thread) -> Event | None:
        # The owner's trap handlers, when set, take breakpoint and single-step traps straight
        # from here (as do_int3 calls kprobe_handler): no event object, no dispatch, on the
        # path every probe hit takes. While queueing, traps are queued as events instead.
        if t.stepping:
            t.stepping = False
            if self.step_handler is not None and not self._queue_all:
                t.event_pending = None
                self.step_handler(t.tid)
                return None
            return self._pending(t, Event(EventKind.SINGLESTEP, t.tid, signal=_SIGTRAP))
        rip = ptrace.get_rip(t.tid)
        if rip - 1 in self.breakpoints.original:
            if self.breakpoint_handler is not None and not self._queue_all:
                t.event_pending = None
                self.breakpoint_handler(t.tid, rip - 1)
                return None
            return self._pending(t, Event(EventKind.BREAKPOINT, t.tid, signal=_SIGTRAP, address=rip - 1))
        info = ptrace.getsiginfo(t.tid)
        if info.si_code == ptrace.SI_KERNEL and rip - 1 in self.breakpoints.retired:
            # It trapped on a breakpoint removed since: run the original instruction instead.
            ptrace.set_rip(t.tid, rip - 1)
            if not self._queue_all:
                self._resume_quietly(t)
            return None
        return self._pending(t, Event(EventKind.SIGNAL, t.tid, signal=_SIGTRAP, siginfo=info))

    def _pending(self, t: Thread, event: Event) -> Event:
        """An event its owner must handle; the thread stays stopped until resume()."""
        t.event_pending = event
        if self._queue_all:
            self._queue.append(event)
        return event

    def _settle(self, t: Thread, event: Event) -> Event:
        """An event the layer resumes by itself (at thaw if queueing)."""
        if self._queue_all:
            self._queue.append(event)
        else:
            self._resume_quietly(t)
        return event

    def _exited(self, tid: int, t: Thread | None, status: int) -> Event | None:
        code = exit_code_of(status)
        if tid == self.pid:
            self.alive = False
            self.exit_code = code
            self.threads.clear()
            return Event(EventKind.PROCESS_EXIT, tid, exit_code=code)
        if t is None:
            return None  # a thread dropped at exec, or a child that is not ours to trace
        del self.threads[tid]
        return Event(EventKind.THREAD_EXIT, tid, exit_code=code)

    # ------------------------------------------------------------------ ptrace-event stops
    def _interrupt_or_group_stop(self, t: Thread, sig: int) -> Event | None:
        if sig in STOP_SIGNALS:
            t.group_stopped = True
            return self._settle(t, Event(EventKind.GROUP_STOP, t.tid, signal=sig))
        # An interrupt stop: ours from freeze() or wake(), the first stop of a new
        # thread, or a stale interrupt requested while the thread was stopped already.
        t.group_stopped = False
        if self._queue_all:
            return None
        if self._wake_requested:
            self._wake_requested = False
            return self._settle(t, Event(EventKind.WAKE, t.tid))
        self._resume_quietly(t)
        return None

    def _clone(self, t: Thread, sig: int) -> Event:
        child = ptrace.geteventmsg(t.tid)
        self._adopt(child, vfork_child=False)
        return self._settle(t, Event(EventKind.CLONE, t.tid, child=child))

    def _fork(self, t: Thread, sig: int) -> Event:
        child = ptrace.geteventmsg(t.tid)
        self._release_fork_child(child, t.tid)
        return self._settle(t, Event(EventKind.FORK, t.tid, child=child))

    def _vfork(self, t: Thread, sig: int) -> Event:
        child = ptrace.geteventmsg(t.tid)
        t.in_vfork = True
        if self.vfork_handler is not None:
            self.vfork_handler(t.tid, False)
        self._adopt(child, vfork_child=True)
        return self._settle(t, Event(EventKind.VFORK, t.tid, child=child))

    def _vfork_done(self, t: Thread, sig: int) -> None:
        t.in_vfork = False
        if self.vfork_handler is not None:
            self.vfork_handler(t.tid, True)
        if not self._queue_all:
            self._resume_quietly(t)
        return None

    def _exec(self, t: Thread, sig: int) -> Event | None:
        if t.vfork_child:
            # The vforked child has its own memory now: it is not ours to keep.
            del self.threads[t.tid]
            try:
                ptrace.detach(t.tid, 0)
            except OSError:
                pass
            return None
        return self._pending(t, self._after_exec(t.tid))

    def _exiting(self, t: Thread, sig: int) -> Event:
        t.exiting = True
        try:
            self.thread_pointers[t.tid] = ptrace.getregs(t.tid).fs_base  # for records read later
        except OSError:
            pass
        self.thread_names[t.tid] = procfs.thread_name(self.pid, t.tid)
        exiting = Event(EventKind.EXITING, t.tid, exit_code=exit_code_of(ptrace.geteventmsg(t.tid)))
        if self._queue_all:
            self._queue.append(exiting)
        # Let it finish at once, even while freezing or held: it never runs user code again,
        # and keeping it stopped would keep its whole thread group from ending (an exited
        # group leader is reported only once every other thread is reaped, so a freeze
        # waiting for that leader would wait forever).
        t.held = t.group_stopped = False
        self._resume_quietly(t)
        return exiting

    def _unknown_event(self, t: Thread, sig: int) -> Event:
        return self._settle(t, Event(EventKind.WAKE, t.tid))

    def _adopt(self, child: int, vfork_child: bool) -> None:
        """Enter a thread the kernel auto-attached (clone, vfork); handle a stop it already made."""
        if child in self.threads:
            return
        t = Thread(child, ThreadState.NEW, vfork_child=vfork_child)
        self.threads[child] = t
        early = self._early.pop(child, None)
        if early is not None:
            self._handle(child, early)


# The stops that carry a ptrace event (status >> 16), by event.
_EVENT_STOPS: dict[int, Callable[[StopDecoder, Thread, int], Event | None]] = {
    ptrace.PTRACE_EVENT_STOP: StopDecoder._interrupt_or_group_stop,
    ptrace.PTRACE_EVENT_CLONE: StopDecoder._clone,
    ptrace.PTRACE_EVENT_FORK: StopDecoder._fork,
    ptrace.PTRACE_EVENT_VFORK: StopDecoder._vfork,
    ptrace.PTRACE_EVENT_VFORK_DONE: StopDecoder._vfork_done,
    ptrace.PTRACE_EVENT_EXEC: StopDecoder._exec,
    ptrace.PTRACE_EVENT_EXIT: StopDecoder._exiting,
}
