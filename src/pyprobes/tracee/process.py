"""A traced process: its thread table, its stops turned into events, freeze/thaw, detach.

All ptrace calls must come from the one thread that attached, so a Tracee is used from
one thread only; its owner runs the event loop (wait() / resume()).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal as _signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from . import ptrace
from .breakpoints import Breakpoints
from .errors import AlreadyTraced, NoSuchProcess, PermissionDenied, ProcessExited, SpawnError, TraceeError
from .events import Event, EventKind
from .memory import Memory
from .ptrace import Regs
from .threads import StopKind, Thread, ThreadState

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
STOP_SIGNALS = frozenset({_signal.SIGSTOP, _signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU})
# Signals an instruction raises itself: with a kernel si_code (> 0), RIP is still at it.
FAULT_SIGNALS = frozenset({_signal.SIGSEGV, _signal.SIGBUS, _signal.SIGFPE, _signal.SIGILL})


def is_fault(event: Event) -> bool:
    """A SIGNAL event raised by the instruction at its stopped thread's RIP (which has not run)."""
    if event.kind is not EventKind.SIGNAL or event.signal not in FAULT_SIGNALS:
        return False
    if event.siginfo is None:
        event.siginfo = ptrace.getsiginfo(event.tid)
    return event.siginfo.si_code > 0
_SIGTRAP = _signal.SIGTRAP
_SIGTRAP_BIT = 1 << (_SIGTRAP - 1)
_TRAP_STOP = (_SIGTRAP << 8) | 0x7F  # the wait status of a SIGTRAP signal-delivery stop (no ptrace event)


@dataclass
class Snapshot:
    """What freeze() saw: every thread's registers and every event that arrived while stopping."""

    regs: dict[int, Regs] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    @property
    def tids(self) -> set[int]:
        return set(self.regs)


def _exit_code(status: int) -> int:
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return -os.WTERMSIG(status)


def _tracer_of(pid: int, tid: int | None = None) -> tuple[int, str]:
    status = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    tracer = int(line.split()[1])
                    break
            else:
                return 0, ""
    except OSError:
        return 0, ""
    if not tracer:
        return 0, ""
    try:
        with open(f"/proc/{tracer}/comm") as f:
            return tracer, f.read().strip()
    except OSError:
        return tracer, "?"


def _is_zombie(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class Tracee:
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
        self._queue: deque[Event] = deque()
        self._early: dict[int, int] = {}       # stops of tids we did not know yet (new threads, fork children)
        self._freezing = False
        self._wake_requested = False
        self._syscall_insn: int | None = None
        # Called as hook(child_memory, forking_tid) before a forked child is let go untraced.
        # The owner's handlers for a breakpoint hit (tid, address) and a finished single-step
        # (tid); each must resume the thread. Unset, those traps come out of wait() as events.
        self.breakpoint_handler: Callable[[int, int], None] | None = None
        self.step_handler: Callable[[int], None] | None = None
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
        self.fork_hooks: list[Callable[[Memory, int], None]] = []
        self._live_regs = ptrace.LiveRegs()

    # ------------------------------------------------------------------ starting
    @classmethod
    def spawn(cls, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> "Tracee":
        """Start ARGV traced, stopped before its first instruction (at the exec stop)."""
        if not argv:
            raise SpawnError("no command given")
        exe = argv[0]
        if os.sep not in exe:
            found = shutil.which(exe, path=(env or os.environ).get("PATH"))
            if found is None:
                raise SpawnError(f"command not found: {exe}")
            exe = found
        elif not os.path.exists(exe if cwd is None else os.path.join(cwd, exe)):
            raise SpawnError(f"no such file: {exe}")
        elif not os.access(exe if cwd is None else os.path.join(cwd, exe), os.X_OK):
            raise SpawnError(f"not executable: {exe}")
        environ = dict(os.environ if env is None else env)
        pid = os.fork()
        if pid == 0:  # the child: stop, so the parent can seize us before exec
            try:
                if cwd is not None:
                    os.chdir(cwd)
                # Python ignores SIGPIPE; an exec'd program expects the default.
                _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
                os.kill(os.getpid(), _signal.SIGSTOP)
                os.execve(exe, list(argv), environ)
            except BaseException:
                pass
            os._exit(127)
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise SpawnError(f"could not start {argv[0]}: child ended before exec")
        ptrace.seize(pid, ptrace.TRACE_OPTIONS | ptrace.PTRACE_O_TRACEVFORKDONE | ptrace.PTRACE_O_EXITKILL)
        os.kill(pid, _signal.SIGCONT)
        self = cls(pid, spawned=True)
        self.threads[pid] = Thread(pid, ThreadState.STOPPED)
        # Walk the child from its SIGSTOP to the exec stop, delivering nothing of our dance.
        while True:
            _, status = os.waitpid(pid, ptrace.WALL)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.alive = False
                raise SpawnError(f"could not execute {argv[0]} (child exited with {_exit_code(status)})")
            event = status >> 16
            if event == ptrace.PTRACE_EVENT_EXEC:
                break
            ptrace.cont(pid, 0)
        self.threads[pid].stop_kind = StopKind.EVENT
        self.exec_count = 1
        return self

    @classmethod
    def attach(cls, pid: int) -> "Tracee":
        """PTRACE_SEIZE every thread of PID, race-free against threads created meanwhile."""
        if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
            raise NoSuchProcess(pid)
        if pid == os.getpid():
            raise TraceeError("pyprobes cannot trace itself")
        self = cls(pid, spawned=False)
        options = ptrace.TRACE_OPTIONS | ptrace.PTRACE_O_TRACEVFORKDONE
        try:
            ptrace.seize(pid, options)
        except OSError as e:
            self.alive = False
            if e.errno == errno.ESRCH:
                raise NoSuchProcess(pid) from None
            if e.errno == errno.EPERM:
                tracer, name = _tracer_of(pid)
                if tracer:
                    raise AlreadyTraced(pid, tracer, name) from None
                if _is_zombie(pid, pid) and os.path.exists(f"/proc/{pid}"):
                    # The kernel refuses to attach to an exited task, and the leader's tid is
                    # the one every process-wide event (exit, exec) is reported on.
                    raise TraceeError(f"cannot attach to PID {pid}: its main thread has exited "
                                      "(pthread_exit) while other threads run on") from None
                raise PermissionDenied(pid) from None
            raise TraceeError(f"cannot attach to PID {pid}: {e.strerror}") from None
        self.threads[pid] = Thread(pid)
        if _is_zombie(pid, pid):
            self.threads[pid].exiting = True
        try:
            self._seize_threads(pid, options)
        except BaseException:
            # Leave nothing seized behind (another tracer holding one thread, the process gone).
            try:
                self.detach()
            except Exception:
                pass
            raise
        return self

    def _seize_threads(self, pid: int, options: int) -> None:
        """Seize every thread of PID besides the leader (attach's second half)."""
        # Threads cloned by an already-seized thread are auto-attached (and come in through
        # their clone events); the rest appear in /proc/PID/task: seize until it is stable.
        while True:
            try:
                listed = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
            except FileNotFoundError:
                raise NoSuchProcess(pid) from None
            new = listed - set(self.threads) - set(self._early)
            if not new:
                break
            for tid in new:
                try:
                    ptrace.seize(tid, options)
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        continue  # exited meanwhile
                    if e.errno == errno.EPERM:
                        tracer, name = _tracer_of(pid, tid)
                        if tracer == os.getpid():
                            # Already ours: a clone of a seized thread, auto-attached. Its
                            # clone event or first stop will arrive; account for it now.
                            self.threads[tid] = Thread(tid, ThreadState.NEW)
                        elif tracer:
                            raise AlreadyTraced(pid, tracer, name) from None  # one of its threads
                        # Else it has exited (the kernel refuses exited tasks): it would never
                        # stop for us. It leaves /proc/PID/task soon; look again.
                        continue
                    raise
                t = Thread(tid)
                t.exiting = _is_zombie(pid, tid)
                self.threads[tid] = t

    # ------------------------------------------------------------------ decoding stops
    def _handle(self, tid: int, status: int) -> Event | None:
        """Account for one wait status; return the event for the owner, or None if handled here."""
        t = self.threads.get(tid)
        if status == _TRAP_STOP and t is not None:
            # Tested first: every probe hit and every finished single-step is one of these.
            t.state = ThreadState.STOPPED
            t.stop_kind = StopKind.SIGNAL
            return self._handle_sigtrap(t)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            code = _exit_code(status)
            if tid == self.pid:
                self.alive = False
                self.exit_code = code
                self.threads.clear()
                return Event(EventKind.PROCESS_EXIT, tid, exit_code=code)
            if t is None:
                return None  # a thread dropped at exec, or a child that is not ours to trace
            del self.threads[tid]
            return Event(EventKind.THREAD_EXIT, tid, exit_code=code)
        if not os.WIFSTOPPED(status):
            return None
        if t is None:
            self._early[tid] = status
            return None
        sig = os.WSTOPSIG(status)
        event = status >> 16
        t.state = ThreadState.STOPPED
        t.stop_kind = StopKind.EVENT
        if event == 0:
            t.stop_kind = StopKind.SIGNAL
            if sig == _SIGTRAP:
                return self._handle_sigtrap(t)
            return self._pending(t, Event(EventKind.SIGNAL, tid, signal=sig))
        if event == ptrace.PTRACE_EVENT_STOP:
            if sig in STOP_SIGNALS:
                t.group_stopped = True
                return self._settle(t, Event(EventKind.GROUP_STOP, tid, signal=sig))
            # An interrupt stop: ours from freeze() or wake(), the first stop of a new
            # thread, or a stale interrupt requested while the thread was stopped already.
            t.group_stopped = False
            if self._freezing:
                return None
            if self._wake_requested:
                self._wake_requested = False
                return self._settle(t, Event(EventKind.WAKE, tid))
            self._resume_quietly(t)
            return None
        if event == ptrace.PTRACE_EVENT_CLONE:
            child = ptrace.geteventmsg(tid)
            self._adopt(child, vfork_child=False)
            return self._settle(t, Event(EventKind.CLONE, tid, child=child))
        if event == ptrace.PTRACE_EVENT_FORK:
            child = ptrace.geteventmsg(tid)
            self._release_fork_child(child, tid)
            return self._settle(t, Event(EventKind.FORK, tid, child=child))
        if event == ptrace.PTRACE_EVENT_VFORK:
            child = ptrace.geteventmsg(tid)
            t.in_vfork = True
            self._adopt(child, vfork_child=True)
            return self._settle(t, Event(EventKind.VFORK, tid, child=child))
        if event == ptrace.PTRACE_EVENT_VFORK_DONE:
            t.in_vfork = False
            if not self._freezing:
                self._resume_quietly(t)
            return None
        if event == ptrace.PTRACE_EVENT_EXEC:
            if t.vfork_child:
                # The vforked child has its own memory now: it is not ours to keep.
                del self.threads[tid]
                try:
                    ptrace.detach(tid, 0)
                except OSError:
                    pass
                return None
            return self._pending(t, self._after_exec(tid))
        if event == ptrace.PTRACE_EVENT_EXIT:
            t.exiting = True
            exiting = Event(EventKind.EXITING, tid, exit_code=_exit_code(ptrace.geteventmsg(tid)))
            if self._freezing:
                self._queue.append(exiting)
            # Let it finish at once, even while freezing or held: it never runs user code again,
            # and keeping it stopped would keep its whole thread group from ending (an exited
            # group leader is reported only once every other thread is reaped, so a freeze
            # waiting for that leader would wait forever).
            t.held = t.group_stopped = False
            self._resume_quietly(t)
            return exiting
        return self._settle(t, Event(EventKind.WAKE, tid))

    def _handle_sigtrap(self, t: Thread) -> Event | None:
        # The owner's trap handlers, when set, take breakpoint and single-step traps straight
        # from here (as do_int3 calls kprobe_handler): no event object, no dispatch, on the
        # path every probe hit takes. While freezing, traps are queued as events instead.
        if t.stepping:
            t.stepping = False
            if self.step_handler is not None and not self._freezing:
                t.event_pending = None
                self.step_handler(t.tid)
                return None
            return self._pending(t, Event(EventKind.SINGLESTEP, t.tid, signal=_SIGTRAP))
        rip = ptrace.get_rip(t.tid)
        if rip - 1 in self.breakpoints.original:
            if self.breakpoint_handler is not None and not self._freezing:
                t.event_pending = None
                self.breakpoint_handler(t.tid, rip - 1)
                return None
            return self._pending(t, Event(EventKind.BREAKPOINT, t.tid, signal=_SIGTRAP, address=rip - 1))
        info = ptrace.getsiginfo(t.tid)
        if info.si_code == ptrace.SI_KERNEL and rip - 1 in self.breakpoints.retired:
            # It trapped on a breakpoint removed since: run the original instruction instead.
            ptrace.set_rip(t.tid, rip - 1)
            if not self._freezing:
                self._resume_quietly(t)
            return None
        return self._pending(t, Event(EventKind.SIGNAL, t.tid, signal=_SIGTRAP, siginfo=info))

    def _pending(self, t: Thread, event: Event) -> Event:
        """An event its owner must handle; the thread stays stopped until resume()."""
        t.event_pending = event
        if self._freezing:
            self._queue.append(event)
        return event

    def _settle(self, t: Thread, event: Event) -> Event:
        """An event the layer resumes by itself (at thaw if freezing)."""
        if self._freezing:
            self._queue.append(event)
        else:
            self._resume_quietly(t)
        return event

    def _resume_quietly(self, t: Thread) -> None:
        if t.held:
            return
        try:
            if t.group_stopped:
                ptrace.listen(t.tid)
                t.state = ThreadState.LISTENING
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

    def _adopt(self, child: int, vfork_child: bool) -> None:
        if child in self.threads:
            return
        t = Thread(child, ThreadState.NEW, vfork_child=vfork_child)
        self.threads[child] = t
        early = self._early.pop(child, None)
        if early is not None:
            self._handle(child, early)

    def _wait_for_first_stop(self, child: int) -> bool:
        status = self._early.pop(child, None)
        while status is None:
            try:
                _, status = os.waitpid(child, ptrace.WALL)
            except ChildProcessError:
                return False
        return os.WIFSTOPPED(status)

    def _release_fork_child(self, child: int, parent_tid: int) -> None:
        """A forked child inherits our int3 bytes: scrub them, then let it go untraced."""
        if not self._wait_for_first_stop(child):
            return
        memory = Memory(child)
        try:
            self.breakpoints.scrub(memory)
            for hook in self.fork_hooks:
                hook(memory, parent_tid)
        finally:
            memory.close()
        try:
            ptrace.detach(child, 0)
        except OSError:
            pass

    def _after_exec(self, tid: int) -> Event:
        former = ptrace.geteventmsg(tid)
        # Every other thread is gone; the exec'ing thread now carries the leader's tid.
        leader = self.threads.get(tid) or Thread(tid, ThreadState.STOPPED)
        leader.state = ThreadState.STOPPED
        self.threads = {tid: leader}
        leader.stepping = leader.in_vfork = leader.exiting = False
        self.memory.reopen()
        self.breakpoints.forget()
        self._syscall_insn = None
        self.exec_count += 1
        return Event(EventKind.EXEC, tid, child=former)

    # ------------------------------------------------------------------ the event loop
    def _reap(self, block: bool) -> tuple[int, int]:
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
        for t in list(self.threads.values()):
            if t.state is ThreadState.RUNNING and not t.exiting:
                try:
                    ptrace.interrupt(t.tid)
                    return
                except OSError:
                    continue

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
            _requeue(self.pid, t.tid, sig, sig_info)
        t.held_signals.clear()
        return signal

    def resume(self, tid: int, signal: int = 0, step: bool = False) -> None:
        """Resume a stopped thread, injecting SIGNAL; deliver a held signal when its stop allows."""
        t = self.threads[tid]
        owed = t.event_pending
        t.event_pending = None
        if step and not signal and owed is not None and owed.kind is EventKind.SIGNAL:
            # Stepping on from a signal stop would drop its signal: hold it for a later stop.
            t.held_signals.append((owed.signal, owed.siginfo or ptrace.getsiginfo(tid)))
        if t.held and not step:
            return
        if not signal and not step and t.held_signals:
            signal = self._owed_signal(t)
        t.stepping = step
        try:
            if step:
                ptrace.singlestep(tid, signal)
            elif t.group_stopped and not signal:
                ptrace.listen(tid)
                t.state = ThreadState.LISTENING
                return
            else:
                ptrace.cont(tid, signal)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
        t.state = ThreadState.RUNNING
        self._resumed = True

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
            freezing, self._freezing = self._freezing, True  # queue, never resume, whatever comes
            try:
                event = self._handle(tid, status)
            finally:
                self._freezing = freezing
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

    # ------------------------------------------------------------------ freeze / thaw
    @property
    def frozen(self) -> bool:
        return self._freezing

    def freeze(self) -> Snapshot:
        """Stop every thread and account for each; events that arrive meanwhile are queued."""
        if not self.alive:
            raise ProcessExited(self.pid, self.exit_code)
        self._freezing = True
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
            self._freezing = False
            raise ProcessExited(self.pid, self.exit_code)
        for tid in list(self.threads):
            self._report_pending_trap(tid)
        if not self.alive:
            self._freezing = False
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
        self._freezing = False
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
        if resume and t.state is ThreadState.STOPPED and not t.event_pending and not self._freezing:
            self._resume_quietly(t)

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

    # ------------------------------------------------------------------ registers
    def get_regs(self, tid: int, regs: Regs | None = None) -> Regs:
        return ptrace.getregs(tid, regs)

    def set_regs(self, tid: int, regs: Regs) -> None:
        ptrace.setregs(tid, regs)

    def get_rip(self, tid: int) -> int:
        return ptrace.get_rip(tid)

    def set_rip(self, tid: int, rip: int) -> None:
        ptrace.set_rip(tid, rip)

    def get_reg(self, tid: int, name: str) -> int:
        """One register of a stopped thread (one PEEKUSER), by its Regs field name."""
        return ptrace.peekuser(tid, ptrace.REG_OFFSET[name])

    def live_regs(self, tid: int) -> "ptrace.LiveRegs":
        """TID's registers read and written one at a time on access (PEEKUSER/POKEUSER): cheaper
        than get_regs/set_regs for an instruction that touches one or two. One object, reused."""
        live = self._live_regs
        live.tid = tid
        return live

    def get_siginfo(self, tid: int) -> "ptrace.SigInfo":
        """The siginfo of TID's current signal-delivery stop."""
        return ptrace.getsiginfo(tid)

    def get_xmm0(self, tid: int) -> bytes:
        return ptrace.get_xmm0(tid)

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

    # ------------------------------------------------------------------ leaving
    def detach(self) -> None:
        """Remove every breakpoint, resume and detach every thread; the process runs on untraced."""
        if not self.attached:
            return
        if not self.alive:
            self.attached = False
            self.memory.close()
            return
        try:
            self.freeze()
        except ProcessExited:
            self.attached = False
            self.memory.close()
            return
        self.breakpoints.remove_all()
        pending = {}
        # Events never handled (queued by the freeze, or a handler interrupted by Ctrl-C):
        # a thread stopped on a breakpoint runs the original instruction instead, and a
        # signal still owed to a thread is delivered as it detaches.
        for t in self.threads.values():
            event = t.event_pending
            if event is None:
                continue
            if event.kind is EventKind.BREAKPOINT and ptrace.get_rip(t.tid) == event.address + 1:
                ptrace.set_rip(t.tid, event.address)
            elif event.kind is EventKind.SIGNAL:
                pending[t.tid] = event.signal
        self._queue.clear()
        self._freezing = False
        for t in list(self.threads.values()):
            signals = [s for s, _ in t.held_signals]
            sig = pending.get(t.tid, 0)
            if not sig and signals and t.stop_kind is StopKind.SIGNAL:
                sig = signals.pop(0)
            if t.state is not ThreadState.STOPPED:
                if t.exiting and t.tid != self.pid:
                    # Past its exit event it cannot be detached, and a traced thread that dies
                    # stays a zombie until its tracer collects it: then its process could never
                    # be reaped. It dies promptly; collect it. (The leader's death is reported
                    # only once its whole group is gone, so it cannot be waited for here.)
                    try:
                        os.waitpid(t.tid, ptrace.WALL)
                    except ChildProcessError:
                        pass
                continue  # blocked in vfork: it is detached by its own exit
            try:
                ptrace.detach(t.tid, sig)
            except OSError:
                pass
            for s in signals:
                try:
                    _tgkill(self.pid, t.tid, s)
                except OSError:
                    pass
        self.threads.clear()
        self.attached = False
        self.memory.close()

    def kill(self) -> int | None:
        """SIGKILL the process and collect its exit."""
        if self.alive:
            try:
                os.kill(self.pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._queue.clear()
            # A killed thread still reports its exit stop (TRACEEXIT) and waits there to be
            # resumed: a held one would never be, and the process would never finish dying.
            for t in self.threads.values():
                t.held = False
            while self.alive:
                tid, status = self._reap(block=True)
                if status != -1:
                    self._handle(tid, status)
        self.attached = False
        self.memory.close()
        return self.exit_code

    def close(self) -> None:
        """Leave the process as found: detached if attached, killed if we spawned it and it still waits at exec."""
        self.detach()


def _requeue(tgid: int, tid: int, sig: int, info: "ptrace.SigInfo | None") -> None:
    """Make SIG pending again for thread TID, with its siginfo where the kernel allows
    (rt_tgsigqueueinfo refuses kernel-made siginfo, si_code >= 0, from another process)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if info is not None and libc.syscall(297, tgid, tid, sig, ctypes.byref(info)) == 0:  # SYS_rt_tgsigqueueinfo
        return
    try:
        _tgkill(tgid, tid, sig)
    except OSError:
        pass  # the thread is gone: so is anything it was owed


def _tgkill(tgid: int, tid: int, sig: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, tgid, tid, sig) != 0:  # SYS_tgkill
        raise OSError(ctypes.get_errno(), "tgkill")


def pending_unblocked(pid: int, tid: int) -> int:
    """The mask of signals pending for thread TID alone (SigPnd) that it does not block."""
    pending = blocked = 0
    try:
        with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigPnd:"):
                    pending = int(line[7:], 16)
                elif line.startswith(b"SigBlk:"):
                    blocked = int(line[7:], 16)
                    break
    except OSError:
        return 0
    return pending & ~blocked
