"""Resuming a stopped thread, and the signals held from it until a stop can carry them.

A signal that arrives while a thread runs in pyprobes' own code (a slot's copy, a
single-step) must reach the program only once the thread is back in original code: it is
held on the thread (Thread.held_signals) and delivered by a later resume from a stop that
can carry a signal (a signal-delivery stop); more than one are re-queued to the thread.
"""
from __future__ import annotations

import errno
import signal as _signal
from collections import deque

from . import ptrace
from .events import Event, EventKind
from .threads import StopKind, Thread, ThreadState

# Signals an instruction raises itself: with a kernel si_code (> 0), RIP is still at it.
FAULT_SIGNALS = frozenset({_signal.SIGSEGV, _signal.SIGBUS, _signal.SIGFPE, _signal.SIGILL})


def is_fault(event: Event) -> bool:
    """A SIGNAL event raised by the instruction at its stopped thread's RIP (which has not run)."""
    if event.kind is not EventKind.SIGNAL or event.signal not in FAULT_SIGNALS:
        return False
    if event.siginfo is None:
        event.siginfo = ptrace.getsiginfo(event.tid)
    return event.siginfo.si_code > 0


def requeue(tgid: int, tid: int, sig: int, info: ptrace.SigInfo | None) -> None:
    """Make SIG pending again for thread TID, with its siginfo where the kernel allows
    (rt_tgsigqueueinfo refuses kernel-made siginfo, si_code >= 0, from another process)."""
    if info is not None and ptrace.rt_tgsigqueueinfo(tgid, tid, sig, info):
        return
    try:
        ptrace.tgkill(tgid, tid, sig)
    except OSError:
        pass  # the thread is gone: so is anything it was owed


def _back_to_group_stop(t: Thread) -> int:
    """The signal that puts T back into the job-control stop its process is in, T having left
    it (a single-step from the group stop, for an injected system call, ends in a trap stop,
    which PTRACE_LISTEN refuses with EIO). SIGSTOP, whatever stopped the process: a SIGTSTP
    would run the program's handler for it instead. It comes back as a GROUP_STOP event."""
    t.group_stopped = False
    return _signal.SIGSTOP


class HeldSignals:
    """Tracee's resume(), the layer's own resume of a thread, and the signals they deliver."""

    # Of the Tracee this is part of (see Tracee.__init__):
    pid: int
    threads: dict[int, Thread]
    _queue: deque[Event]
    _resumed: bool

    def resume(self, tid: int, signal: int = 0, step: bool = False) -> None:
        """Resume a stopped thread, injecting SIGNAL; deliver a held signal when its stop allows."""
        t = self.threads[tid]
        owed = t.event_pending
        t.event_pending = None
        if step and not signal and owed is not None and owed.kind is EventKind.SIGNAL:
            # Stepping on from a signal stop would drop its signal: hold it for a later stop.
            t.held_signals.append((owed.signal, owed.siginfo or ptrace.getsiginfo(tid)))
            if owed in self._queue:
                # Queued by a freeze (a migration steps it before its owner saw it): that stop
                # is over and its signal held, so the owner must not resume the thread with it
                # again, from whatever stop the thread is in by then.
                self._queue.remove(owed)
        if t.held and not step:
            return
        if not signal and not step and t.held_signals:
            signal = self._owed_signal(t)
        t.stepping = step
        try:
            if step:
                ptrace.singlestep(tid, signal)
            elif t.group_stopped and not signal:
                if t.stop_kind is StopKind.EVENT:
                    ptrace.listen(tid)
                    t.state = ThreadState.LISTENING
                    return
                signal = _back_to_group_stop(t)
                ptrace.cont(tid, signal)
            else:
                ptrace.cont(tid, signal)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
        t.state = ThreadState.RUNNING
        self._resumed = True

    def _resume_quietly(self, t: Thread) -> None:
        """Let a thread stopped by the layer itself (not for its owner) go on as it was going."""
        if t.held:
            return
        try:
            if t.group_stopped and t.stop_kind is StopKind.EVENT:
                ptrace.listen(t.tid)
                t.state = ThreadState.LISTENING
            elif t.group_stopped:
                ptrace.cont(t.tid, _back_to_group_stop(t))
                t.state = ThreadState.RUNNING
                self._resumed = True
            elif t.stepping and not t.exiting:
                # Stopped (by a freeze's interrupt, say) before its single-step reported: resume
                # it stepping, or PTRACE_CONT clears the trap flag and it runs on past the
                # instruction it was stepping (out of the end of a slot's copy).
                ptrace.singlestep(t.tid, 0)
                t.state = ThreadState.RUNNING
                self._resumed = True
            else:
                ptrace.cont(t.tid, self._owed_signal(t))
                t.state = ThreadState.RUNNING
                self._resumed = True
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
            t.state = ThreadState.RUNNING  # dying: its exit status will come
            self._resumed = True

    def _owed_signal(self, t: Thread) -> int:
        """The first signal held from T, to deliver as it resumes if its stop can carry one
        (a signal-delivery stop), with its siginfo put back; else 0 and it stays held."""
        if not t.held_signals or t.stop_kind is not StopKind.SIGNAL:
            return 0
        signal, info = t.held_signals.pop(0)
        if info is not None:
            ptrace.setsiginfo(t.tid, info)
        # One signal goes in with this resume; the others go back to the thread as pending
        # signals, each to stop it again and be delivered, rather than wait for a later stop
        # of the thread that may never come (it would exit with them still held).
        for sig, sig_info in t.held_signals:
            requeue(self.pid, t.tid, sig, sig_info)
        t.held_signals.clear()
        return signal
