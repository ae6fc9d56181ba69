"""A traced process's life as the tracer sees it: spawned or attached, forking, exec'ing,
and left again (detached or killed)."""
from __future__ import annotations

import errno
import os
import shutil
import signal as _signal
from collections import deque
from typing import TYPE_CHECKING, Callable, Sequence

from . import ptrace
from .breakpoints import Breakpoints
from .errors import AlreadyTraced, NoSuchProcess, PermissionDenied, ProcessExited, SpawnError, TraceeError
from .events import Event, EventKind
from .memory import Memory
from .procfs import has_exited, has_memory, is_zombie, parent_of, tracer_of
from .stops import exit_code_of
from .threads import StopKind, Thread, ThreadState

if TYPE_CHECKING:
    from .process import Tracee


# Python ignores these at startup (and an ignored disposition survives exec), as CPython's
# _Py_RestoreSignals, which subprocess runs with restore_signals=True, knows: the program expects
# the defaults its shell gave it. Other ignored signals (nohup's SIGHUP) were the user's: kept.
PYTHON_IGNORED = tuple(getattr(_signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(_signal, name))


def _restore_signals() -> None:
    """In the spawned child before exec: undo what the Python process did to signals."""
    for sig in PYTHON_IGNORED:
        _signal.signal(sig, _signal.SIG_DFL)
    # The mask is inherited through fork and exec: whatever the forking thread blocked
    # (an embedding program, a library's worker thread) would stay blocked in the program.
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())


class Lifecycle:
    """Tracee's spawn(), attach(), detach(), kill() and close(), and its fork and exec stops."""

    # Of the Tracee this is part of (see Tracee.__init__):
    pid: int
    threads: dict[int, Thread]
    memory: Memory
    breakpoints: Breakpoints
    alive: bool
    attached: bool
    exit_code: int | None
    exec_count: int
    fork_hooks: list[Callable[[Memory, int], None]]
    _queue: deque[Event]
    _queue_all: bool
    _frozen: bool
    _early: dict[int, int]
    _syscall_insn: int | None
    # and, from the other parts: freeze (freezer.py), _reap (loop.py), _handle (stops.py).

    # ------------------------------------------------------------------ starting
    @classmethod
    def spawn(cls, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> Tracee:
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
                _restore_signals()
                os.kill(os.getpid(), _signal.SIGSTOP)
                os.execve(exe, list(argv), environ)
            except BaseException:
                pass
            os._exit(127)
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise SpawnError(f"could not start {argv[0]}: child ended before exec")
        # No PTRACE_O_EXITKILL: a spawned program outlives a killed tracer as an attached one does
        # (the engine's rescue handler takes the int3 bytes left behind: engine/rescue.py).
        ptrace.seize(pid, ptrace.TRACE_OPTIONS | ptrace.PTRACE_O_TRACEVFORKDONE)
        os.kill(pid, _signal.SIGCONT)
        self = cls(pid, spawned=True)
        self.threads[pid] = Thread(pid, ThreadState.STOPPED)
        # Walk the child from its SIGSTOP to the exec stop, delivering nothing of our dance.
        while True:
            _, status = os.waitpid(pid, ptrace.WALL)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.alive = False
                raise SpawnError(f"could not execute {argv[0]} (child exited with {exit_code_of(status)})")
            event = status >> 16
            if event == ptrace.PTRACE_EVENT_EXEC:
                break
            ptrace.cont(pid, 0)
        self.threads[pid].stop_kind = StopKind.EVENT
        self.exec_count = 1
        return self

    @classmethod
    def attach(cls, pid: int) -> Tracee:
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
                tracer, name = tracer_of(pid)
                if tracer:
                    raise AlreadyTraced(pid, tracer, name) from None
                if os.path.exists(f"/proc/{pid}") and has_exited(pid):
                    raise TraceeError(f"process {pid} has exited (a zombie, not yet reaped by its "
                                      f"parent PID {parent_of(pid)})") from None
                if is_zombie(pid, pid) and os.path.exists(f"/proc/{pid}"):
                    # The kernel refuses to attach to an exited task, and the leader's tid is
                    # the one every process-wide event (exit, exec) is reported on.
                    raise TraceeError(f"cannot attach to PID {pid}: its main thread has exited "
                                      "(pthread_exit) while other threads run on") from None
                raise PermissionDenied(pid) from None
            raise TraceeError(f"cannot attach to PID {pid}: {e.strerror}") from None
        self.threads[pid] = Thread(pid)
        if is_zombie(pid, pid):
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
                        tracer, name = tracer_of(pid, tid)
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
                t.exiting = is_zombie(pid, tid)
                self.threads[tid] = t

    # ------------------------------------------------------------------ fork and exec
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
        try:
            self.breakpoints.remove_all()
        except OSError:
            if has_memory(self.pid):
                raise
            # Killed while we froze it (a Ctrl-C's default action, say): its memory is gone
            # with its last thread's exit, and no code of it runs again: nothing to restore.
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
        self._frozen = self._queue_all = False
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
                    ptrace.tgkill(self.pid, t.tid, s)
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
        """Detach if still attached (see detach()): the process runs on untraced, whether we
        spawned it or attached to it. kill() first to end it instead."""
        self.detach()
