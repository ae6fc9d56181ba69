"""The event loop: reaping stops (with a bounded busy-poll before blocking), wait(), wake().

All ptrace calls must come from the one thread that attached, so the loop runs on that
thread: its owner calls wait() and resumes what it returns.
"""
from __future__ import annotations

import os
import time
from collections import deque

from . import ptrace
from .errors import ProcessExited, TraceeError
from .events import Event, EventKind
from .threads import Thread, ThreadState

# Measured with `python -m bench.busy_wait` (README "Speed"): 10-100 µs all take a back-to-back
# boosted hit from ~23-28 to ~17-20 µs; with the back-off a hit every 200 µs costs no more tracer
# CPU than not polling.
DEFAULT_BUSY_WAIT_NS = 25_000
_clock = time.perf_counter_ns
_waitpid = os.waitpid
# Every tracee is the tracer thread's own (ptrace is per thread), so waiting with __WNOTHREAD
# finds them all and leaves alone the children that other threads of this process started.
_WAIT_ANY = ptrace.WALL | ptrace.WNOTHREAD
_WAIT_ANY_NOHANG = _WAIT_ANY | os.WNOHANG


_INTERRUPTIBLE = (ThreadState.RUNNING, ThreadState.LISTENING)


class EventLoop:
    """Tracee's wait(): the next event for the owner, from the queue or the next stop."""

    # Of the Tracee this is part of (see Tracee.__init__):
    pid: int
    threads: dict[int, Thread]
    alive: bool
    exit_code: int | None
    busy_wait_ns: int
    poll_stats: dict[str, int]
    _queue: deque[Event]
    _wake_requested: bool
    _resumed: bool
    _cpus: int
    _polls_missed: int
    _polls_to_skip: int
    # and, from the other parts: _handle (stops.py), resume (signals.py), thaw (freezer.py).

    def _reap(self, block: bool) -> tuple[int, int]:
        """The next (tid, wait status); (0, 0) if not blocking and none is ready; (pid, -1)
        once nothing is left to wait for."""
        try:
            if block and self._resumed and self.busy_wait_ns and len(self.threads) < self._cpus:
                reaped = self._poll()
                if reaped is not None:
                    return reaped
            return os.waitpid(-1, _WAIT_ANY if block else _WAIT_ANY_NOHANG)
        except ChildProcessError:
            # Nothing left to wait for: the process is gone and its status was taken elsewhere.
            if self.alive:
                self.alive = False
                self.threads.clear()
                return self.pid, -1
            raise

    def _poll(self) -> tuple[int, int] | None:
        """waitpid(WNOHANG) until a stop comes or busy_wait_ns is over; None if none came."""
        stats = self.poll_stats
        if self._polls_to_skip:
            self._polls_to_skip -= 1
            stats["skipped"] += 1
            return None
        deadline = _clock() + self.busy_wait_ns
        while True:
            tid, status = _waitpid(-1, _WAIT_ANY_NOHANG)
            if tid:
                self._polls_missed = 0
                stats["caught"] += 1
                return tid, status
            if _clock() > deadline:
                break
        # Stops are sparse: poll again only after 1, 3, 7 ... 63 sleeping waits, so a probe hit
        # every millisecond does not cost a budget of CPU each time.
        stats["timed_out"] += 1
        self._polls_missed = min(self._polls_missed + 1, 6)
        self._polls_to_skip = (1 << self._polls_missed) - 1
        return None

    def wait(self, block: bool = True) -> Event | None:
        """The next event for the owner, or None when not blocking and nothing is ready.

        Returns a WAKE event after wake(); raises ProcessExited once the exit was reported.
        """
        while True:
            if self._queue:
                return self._queue.popleft()
            if not self.alive:
                raise ProcessExited(self.pid, self.exit_code)
            if self._wake_requested:
                self._wake_requested = False
                return Event(EventKind.WAKE, self.pid)
            if block and not self._resumed and \
                    not any(t.state is not ThreadState.STOPPED for t in self.threads.values()):
                raise TraceeError("every thread is stopped: nothing would ever report (resume or thaw first)")
            tid, status = self._reap(block)
            self._resumed = False
            if tid == 0:
                return None
            if status == -1:
                return Event(EventKind.PROCESS_EXIT, tid, exit_code=None)
            try:
                event = self._handle(tid, status)
            except ProcessLookupError:
                # Killed (exit_group, SIGKILL) while its stop was handled -- the breakpoint and
                # step handlers run from here: it is stopped no more, and its exit comes next.
                self.vanished(tid)
                continue
            if event is not None:
                return event

    def vanished(self, tid: int) -> None:
        """TID left its stop while the owner handled it (ptrace said ESRCH): the process is
        being killed, the thread runs to its exit, which is reported like any other."""
        t = self.threads.get(tid)
        if t is not None:
            t.state = ThreadState.RUNNING
            t.event_pending = None
            t.stepping = False

    def wake(self) -> None:
        """Make a blocked wait() return a WAKE event; safe to call from a signal handler."""
        self._wake_requested = True
        # A listening thread (in a job-control stop) reports a fresh group stop when
        # interrupted: with every thread of a stopped process listening, that is the only stop
        # that can come.
        for t in list(self.threads.values()):
            if t.state in _INTERRUPTIBLE and not t.exiting:
                try:
                    ptrace.interrupt(t.tid)
                    return
                except OSError:
                    continue

    def handle_default(self, event: Event) -> None:
        """What a tracer with nothing to add does with an event: let the thread go on as untraced."""
        if not event.needs_resume or event.tid not in self.threads:
            return
        if event.kind is EventKind.SIGNAL:
            self.resume(event.tid, event.signal)
        elif event.kind is EventKind.BREAKPOINT:
            raise TraceeError(f"breakpoint at {event.address:#x} hit with nobody to handle it")
        else:
            self.resume(event.tid)

    def run_to_exit(self) -> int | None:
        """Handle every event the default way until the process exits; return its exit code."""
        self.thaw()
        while True:
            try:
                event = self.wait()
            except ProcessExited:
                return self.exit_code
            if event is not None:
                self.handle_default(event)
