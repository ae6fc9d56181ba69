"""Single-stepping one thread to completion, whatever else the process does meanwhile."""
from __future__ import annotations

import os
from collections import deque

from . import ptrace
from .errors import ProcessExited, TraceeError
from .events import Event, EventKind
from .signals import is_fault
from .threads import Thread, ThreadState


class Stepper:
    """Tracee's step()."""

    # Of the Tracee this is part of (see Tracee.__init__):
    pid: int
    threads: dict[int, Thread]
    exit_code: int | None
    _queue: deque[Event]
    _queue_all: bool
    _resumed: bool
    # and, from the other parts: _handle (stops.py), resume (signals.py).

    def step(self, tid: int) -> Event:
        """Single-step a stopped thread and wait for that step, holding any signal that comes first.

        Returns the SINGLESTEP event; or, when the instruction faults (is_fault), that SIGNAL
        event: the fault is held like any other signal (the thread's next resume delivers it),
        but the step is not redone, since it would only fault again."""
        t = self.threads[tid]
        self.resume(tid, step=True)
        while True:
            try:
                _, status = os.waitpid(tid, ptrace.WALL)
            except ChildProcessError:
                raise ProcessExited(self.pid, self.exit_code) from None
            # Whatever comes is queued, and nothing resumed or handed to the trap handlers:
            # this thread's step is the one stop wanted here.
            queue_all, self._queue_all = self._queue_all, True
            try:
                event = self._handle(tid, status)
            finally:
                self._queue_all = queue_all
            if tid not in self.threads:
                raise ProcessExited(self.pid, self.exit_code)
            if event is not None and event.needs_resume:
                self._queue.remove(event)
                if event.kind is EventKind.SINGLESTEP:
                    t.event_pending = None
                    return event
                if event.kind is EventKind.SIGNAL:
                    if event.siginfo is None:
                        event.siginfo = ptrace.getsiginfo(tid)
                    # Hold it: it must reach the program only once the thread is back in original code.
                    t.held_signals.append((event.signal, event.siginfo))
                    if is_fault(event):
                        t.event_pending = None
                        t.stepping = False
                        return event
                else:
                    self._queue.append(event)
                    raise TraceeError(f"thread {tid} reported {event.kind.value} while single-stepping")
            if t.exiting:
                continue  # dying, and already resumed: its exit comes next
            # Any other stop (a stale interrupt, an informational event) leaves the step to redo.
            t.event_pending = None
            t.stepping = True
            t.state = ThreadState.RUNNING
            self._resumed = True
            ptrace.singlestep(tid, 0)
