"""Errors of the tracee-control layer: each message says what happened and what to check."""
from __future__ import annotations

from ..errors import PyprobesError


class TraceeError(PyprobesError):
    """Something went wrong controlling the traced process."""


class NoSuchProcess(TraceeError):
    def __init__(self, pid: int) -> None:
        super().__init__(f"no process with PID {pid}")
        self.pid = pid


class PermissionDenied(TraceeError):
    def __init__(self, pid: int, detail: str = "") -> None:
        msg = (f"not permitted to trace PID {pid}: run as the same user as the process or as root, "
               "check /proc/sys/kernel/yama/ptrace_scope (0 allows tracing your own processes) "
               "and that the tracer has CAP_SYS_PTRACE")
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
        self.pid = pid


class AlreadyTraced(TraceeError):
    def __init__(self, pid: int, tracer_pid: int, tracer_name: str) -> None:
        super().__init__(f"PID {pid} is already traced by PID {tracer_pid} ({tracer_name}); "
                         "a process can have only one tracer")
        self.pid = pid
        self.tracer_pid = tracer_pid


class ProcessExited(TraceeError):
    """The traced process is gone. exit_code follows subprocess: negative for a killing signal."""

    def __init__(self, pid: int, exit_code: int | None) -> None:
        if exit_code is None:
            how = "exited"
        elif exit_code < 0:
            how = f"was killed by signal {-exit_code}"
        else:
            how = f"exited with status {exit_code}"
        super().__init__(f"process {pid} {how}")
        self.pid = pid
        self.exit_code = exit_code


class SpawnError(TraceeError):
    """The command could not be started."""


class SyscallRefused(TraceeError):
    """A system call to inject that the thread's seccomp state would not let run as it is (it
    would kill the process, raise SIGSYS or fail): it was not injected, and nothing was touched.
    reason says why in the process's terms ("PID 42 runs in seccomp strict mode")."""

    def __init__(self, pid: int, tid: int, syscall: str, reason: str) -> None:
        super().__init__(f"{reason}: pyprobes does not inject {syscall} into it")
        self.pid = pid
        self.tid = tid
        self.syscall = syscall
        self.reason = reason
