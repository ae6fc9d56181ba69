"""The tracee-control layer: ptrace, threads, stops as events, freeze/thaw, memory, injected system calls.

The lowest layer of pyprobes: it imports nothing from the layers above it.
"""
from .errors import (AlreadyTraced, NoSuchProcess, PermissionDenied, ProcessExited, SpawnError,
                     SyscallRefused, TraceeError)
from .events import Event, EventKind
from .freezer import Snapshot
from .loop import DEFAULT_BUSY_WAIT_NS
from .memory import Memory
from .process import Tracee
from .ptrace import Regs
from .signals import is_fault
from .threads import Thread, ThreadState

__all__ = ["DEFAULT_BUSY_WAIT_NS", "AlreadyTraced", "Event", "EventKind", "Memory", "NoSuchProcess", "PermissionDenied",
           "ProcessExited", "Regs", "Snapshot", "SpawnError", "SyscallRefused", "Thread", "ThreadState", "Tracee",
           "TraceeError", "is_fault"]
