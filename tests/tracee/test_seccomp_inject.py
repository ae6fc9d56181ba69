"""The tracee layer asks seccomp before it injects (tracee/seccomp.py): a system call the
thread's strict mode or filters would not let run is refused with SyscallRefused and never
made, one they let through runs as before. The filter is read back from the live thread
(PTRACE_SECCOMP_GET_FILTER) and run on the exact arguments. (tests/fixtures/sec_modes.c)"""
from __future__ import annotations

import os

import pytest

from pyprobes.tracee import SyscallRefused
from pyprobes.tracee.seccomp import MODE_FILTER, MODE_STRICT, mode_of, read_filters
from pyprobes.tracee.syscalls import inject_syscall

SYS_WRITE, SYS_GETPID, SYS_GETPPID = 1, 39, 110


def _frozen(procs, fixture, mode: str):
    run = procs.start(fixture("sec_modes"), mode, 30)  # no "alive" lines: quiet
    run.wait_output(r"^ready$")
    tracee = procs.attach_tracee(run)
    tracee.freeze()
    return run, tracee


def test_strict_mode_lets_only_its_four_calls_through(procs, fixture):
    run, tracee = _frozen(procs, fixture, "strict")
    assert mode_of(run.pid, run.pid) == MODE_STRICT
    with pytest.raises(SyscallRefused) as refused:
        inject_syscall(tracee, run.pid, SYS_GETPID)
    assert str(refused.value) == f"PID {run.pid} runs in seccomp strict mode: pyprobes does not inject getpid into it"
    assert inject_syscall(tracee, run.pid, SYS_WRITE, 1, 0, 0) == 0  # write passes strict mode
    tracee.detach()
    assert not run._exited()
    os.kill(run.pid, 0)


def test_a_filter_is_read_from_the_thread_and_run_on_the_call(procs, fixture):
    run, tracee = _frozen(procs, fixture, "kill-getppid")
    assert mode_of(run.pid, run.pid) == MODE_FILTER
    (program,) = read_filters(run.pid)
    assert len(program) == 7  # the fixture's on_syscall() filter, as installed
    assert inject_syscall(tracee, run.pid, SYS_GETPID) == run.pid
    with pytest.raises(SyscallRefused, match="seccomp filter answers system call 110 with kill-process"):
        inject_syscall(tracee, run.pid, SYS_GETPPID)
    tracee.detach()
    assert not run._exited()
