"""Typed events: every ptrace stop and exit of a traced thread, decoded once."""
from __future__ import annotations

from enum import Enum


class EventKind(Enum):
    BREAKPOINT = "breakpoint"      # int3 of a registered breakpoint; address = the breakpoint
    SINGLESTEP = "singlestep"      # the trap after PTRACE_SINGLESTEP
    SIGNAL = "signal"              # signal-delivery stop: signal, siginfo; the thread waits to be resumed with it or not
    CLONE = "clone"                # a new thread (child = its tid), already in the thread table
    FORK = "fork"                  # a forked child (child = its pid), already scrubbed and detached
    VFORK = "vfork"                # a vforked child, which shares our memory until it execs or exits
    EXEC = "exec"                  # the image was replaced; the thread table is the exec'ing thread alone
    EXITING = "exiting"            # PTRACE_EVENT_EXIT: the thread is about to exit (exit_code = what it exits with)
    THREAD_EXIT = "thread-exit"    # a thread is gone
    PROCESS_EXIT = "process-exit"  # the whole process is gone (exit_code as subprocess reports it)
    GROUP_STOP = "group-stop"      # the thread entered a job-control stop (SIGSTOP and friends)
    WAKE = "wake"                  # wait() was woken on purpose (timeout, a signal to the tracer)


# Events after which the layer has already resumed the thread (or it no longer exists);
# every other event leaves its thread stopped until the caller resumes it.
SELF_RESUMING = frozenset({EventKind.CLONE, EventKind.FORK, EventKind.VFORK, EventKind.EXITING,
                           EventKind.THREAD_EXIT, EventKind.PROCESS_EXIT, EventKind.GROUP_STOP,
                           EventKind.WAKE})


class Event:
    __slots__ = ("kind", "tid", "signal", "address", "child", "exit_code", "siginfo")

    def __init__(self, kind: EventKind, tid: int, signal: int = 0, address: int = 0,
                 child: int = 0, exit_code: int | None = None, siginfo=None) -> None:
        self.kind = kind
        self.tid = tid
        self.signal = signal
        self.address = address
        self.child = child
        self.exit_code = exit_code
        self.siginfo = siginfo

    @property
    def needs_resume(self) -> bool:
        return self.kind not in SELF_RESUMING

    def __repr__(self) -> str:
        parts = [self.kind.value, f"tid={self.tid}"]
        if self.signal:
            parts.append(f"signal={self.signal}")
        if self.address:
            parts.append(f"address={self.address:#x}")
        if self.child:
            parts.append(f"child={self.child}")
        if self.exit_code is not None:
            parts.append(f"exit_code={self.exit_code}")
        return "Event(" + ", ".join(parts) + ")"
