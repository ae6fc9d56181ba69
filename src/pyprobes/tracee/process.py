"""A traced process: the Tracee, made of one part per job.

    stops.py      StopDecoder   a wait status -> the thread table updated, an Event
    loop.py       EventLoop     reaping stops (busy-poll, then block), wait(), wake()
    freezer.py    Freezer       freeze(), thaw(), hold(), release()
    signals.py    HeldSignals   resume(), and signals held until a stop can carry them
    stepping.py   Stepper       step(): one thread's single-step, to completion
    lifecycle.py  Lifecycle     spawn(), attach(), fork and exec stops, detach(), kill()

The parts share the state set up in Tracee.__init__ below (each part lists what it uses) and
are one object, so the hit path (wait -> _reap -> _handle -> _handle_sigtrap -> handler ->
resume) costs no more than plain method calls. All ptrace calls must come from the one
thread that attached, so a Tracee is used from one thread only; its owner runs the event
loop (wait() / resume()).
"""
from __future__ import annotations

import os
from collections import Counter, deque
from typing import Callable

from . import ptrace
from .breakpoints import Breakpoints
from .errors import TraceeError
from .events import Event
from .freezer import Freezer, Snapshot
from .lifecycle import Lifecycle
from .loop import DEFAULT_BUSY_WAIT_NS, EventLoop
from .memory import Memory
from .ptrace import Regs
from .signals import HeldSignals, is_fault
from .stepping import Stepper
from .stops import StopDecoder
from .threads import Thread, ThreadState

__all__ = ["DEFAULT_BUSY_WAIT_NS", "Snapshot", "Tracee", "is_fault"]


class Tracee(Lifecycle, Freezer, Stepper, EventLoop, StopDecoder, HeldSignals):
    """One traced process (thread group) and every thread of it."""

    def __init__(self, pid: int, spawned: bool) -> None:
        self.pid = pid
        self.spawned = spawned
        self.threads: dict[int, Thread] = {}
        self.memory = Memory(pid)
        self.breakpoints = Breakpoints(self.memory)
        self.alive = True
        self.attached = True
        self.exit_code: int | None = None
        self.exec_count = 0
        self._queue: deque[Event] = deque()   # events for the owner that wait() returns first
        self._early: dict[int, int] = {}       # stops of tids we did not know yet (new threads, fork children)
        self._frozen = False                   # between freeze() and thaw()
        # Queue every event and resume no thread for a reason of the layer's own: while frozen,
        # and while step() waits for its step (stops.py).
        self._queue_all = False
        self._wake_requested = False
        # Signal-delivery stops seen, by signal (SIGTRAP of breakpoints and steps aside): what the
        # program has been sent, whether pyprobes delivered it yet or holds it.
        self.signals_reported: Counter[int] = Counter()
        # tid -> its thread pointer (fs_base), read at each new thread's first stop and at its
        # exit: what a record's thread key (%fs:0) is, for threads gone when records are read
        self.thread_pointers: dict[int, int] = {}
        # tid -> its name, read at its exit: for records (and timelines) read after it is gone
        self.thread_names: dict[int, str] = {}
        self._syscall_insn: int | None = None
        # The owner's handlers for a breakpoint hit (tid, address) and a finished single-step
        # (tid); each must resume the thread. Unset, those traps come out of wait() as events.
        self.breakpoint_handler: Callable[[int, int], None] | None = None
        self.step_handler: Callable[[int], None] | None = None
        # The owner's look at a thread that vforks (tid, False: before the child runs) and at
        # it again once the child has exec'd or exited (tid, True): the child ran in its memory.
        self.vfork_handler: Callable[[int, bool], None] | None = None
        # After resuming a thread, wait() polls for the next stop this long before it blocks:
        # a tracer asleep in waitpid is woken by the scheduler (several µs per stop here), one
        # that polls sees the stop at once. Bounded, so a quiet tracee costs one budget per stop.
        self.busy_wait_ns = DEFAULT_BUSY_WAIT_NS
        # Polling pays only on a CPU no traced thread wants: it happens while the process has
        # fewer threads than the tracer has CPUs (with two busy threads on two CPUs, the poll
        # takes the CPU a resumed thread needs to reach its next stop).
        self._cpus = len(os.sched_getaffinity(0))
        self._polls_missed = 0
        self._polls_to_skip = 0
        self.poll_stats = {"caught": 0, "timed_out": 0, "skipped": 0}  # what each wait's poll did
        self._resumed = True  # some thread was resumed since the last reap (wait()'s hang guard)
        # Called as hook(child_memory, forking_tid) before a forked child is let go untraced.
        self.fork_hooks: list[Callable[[Memory, int], None]] = []
        self._live_regs = ptrace.LiveRegs()

    # ------------------------------------------------------------------ registers
    # The hot-path register API: the ptrace calls themselves, so a call through the Tracee
    # costs no Python frame more than calling ptrace directly (tracee.get_rip(tid) and so on).
    get_regs = staticmethod(ptrace.getregs)    # (tid, regs=None) -> Regs: one GETREGS
    set_regs = staticmethod(ptrace.setregs)    # (tid, regs): one SETREGS
    get_rip = staticmethod(ptrace.get_rip)     # (tid) -> int: one PEEKUSER
    set_rip = staticmethod(ptrace.set_rip)     # (tid, rip): one POKEUSER

    def get_reg(self, tid: int, name: str) -> int:
        """One register of a stopped thread (one PEEKUSER), by its Regs field name."""
        return ptrace.peekuser(tid, ptrace.REG_OFFSET[name])

    def live_regs(self, tid: int) -> ptrace.LiveRegs:
        """TID's registers read and written one at a time on access (PEEKUSER/POKEUSER): cheaper
        than get_regs/set_regs for an instruction that touches one or two. One object, reused."""
        live = self._live_regs
        live.tid = tid
        return live

    def get_siginfo(self, tid: int) -> ptrace.SigInfo:
        """The siginfo of TID's current signal-delivery stop."""
        return ptrace.getsiginfo(tid)

    def get_xmm0(self, tid: int) -> bytes:
        return ptrace.get_xmm0(tid)

    def get_xmm(self, tid: int, n: int) -> bytes:
        return ptrace.get_xmm(tid, n)

    # ------------------------------------------------------------------ for injected system calls
    def stopped_thread(self) -> int | None:
        """Some stopped, live thread to inject a system call into, or None; one whose own event
        is still to be handled only when there is no other."""
        fallback = None
        for t in self.threads.values():
            if t.state is ThreadState.STOPPED and not t.exiting and not t.vfork_child:
                if t.event_pending is None:
                    return t.tid
                fallback = fallback or t.tid
        return fallback

    def syscall_instruction(self) -> int:
        """The address of a `syscall` instruction in the tracee's own text, to reuse for injection."""
        if self._syscall_insn is None:
            from .maps import executable_regions  # local: only injection needs the maps
            for start, end in executable_regions(self.pid):
                try:
                    data = self.memory.read(start, end - start)
                except OSError:
                    continue
                at = data.find(b"\x0f\x05")
                if at >= 0:
                    self._syscall_insn = start + at
                    break
            else:
                raise TraceeError(f"no syscall instruction found in PID {self.pid}'s text")
        return self._syscall_insn
