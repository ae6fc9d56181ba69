"""The thread table's entries: what the tracer knows of each traced thread."""
from __future__ import annotations

from enum import Enum

from .ptrace import SigInfo


class ThreadState(Enum):
    RUNNING = "running"        # resumed by us; will report its next stop
    STOPPED = "stopped"        # in a ptrace-stop, its registers readable
    LISTENING = "listening"    # in a job-control stop, PTRACE_LISTEN'ed so SIGCONT can wake it
    NEW = "new"                # auto-attached at clone/vfork; its first stop has not been seen yet


class StopKind(Enum):
    SIGNAL = "signal"          # a signal-delivery stop (breakpoints and single-steps are SIGTRAP ones): a signal can be injected
    EVENT = "event"            # a ptrace-event, interrupt or group stop: an injected signal would be ignored


class Thread:
    __slots__ = ("tid", "state", "stop_kind", "stepping", "event_pending", "held", "group_stopped",
                 "exiting", "in_vfork", "vfork_child", "held_signals")

    def __init__(self, tid: int, state: ThreadState = ThreadState.RUNNING, vfork_child: bool = False) -> None:
        self.tid = tid
        self.state = state
        self.stop_kind = StopKind.EVENT
        self.stepping = False          # resumed with PTRACE_SINGLESTEP: its next SIGTRAP is the step's
        self.event_pending = None      # the event it stopped with that its owner has not handled yet
        self.held = False              # kept stopped across thaw() by its owner's request
        self.group_stopped = False     # inside a job-control stop: resume it with LISTEN, not CONT
        self.exiting = False           # past PTRACE_EVENT_EXIT: it never runs user code again
        self.in_vfork = False          # parent blocked in vfork until the child execs or exits
        self.vfork_child = vfork_child  # a vforked child sharing our memory until exec/exit
        self.held_signals: list[tuple[int, SigInfo | None]] = []  # signals suppressed, to deliver later

    def __repr__(self) -> str:
        return f"Thread({self.tid}, {self.state.value})"
