"""The tracee ending in the middle of a freeze/thaw loop, by its own exit or by SIGKILL from
outside: the loop ends with ProcessExited carrying the exit status, and exit_code is set."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from pyprobes.tracee import ProcessExited

from .conftest import drain, pump


def _freeze_thaw_until_exit(tracee, out, action=None, max_cycles=200_000):
    """Freeze/thaw/drain until ProcessExited; ACTION(cycle, frozen) runs at every step."""
    cycles = 0
    for cycles in range(max_cycles):
        try:
            tracee.freeze()
            if action:
                action(cycles, True)
            tracee.thaw()
            if action:
                action(cycles, False)
            drain(tracee)
            out.poll()
        except ProcessExited as e:
            return e, cycles
    raise AssertionError(f"the process did not end in {max_cycles} cycles")


def test_exit_during_freeze_thaw_loop(procs, fixture):
    tracee, out = procs.spawn_tracee([fixture("tr_exit_mid"), 4, 300, 42])
    tracee.thaw()
    pump(tracee, lambda: out.search("^ready$"), output=out)
    exc, cycles = _freeze_thaw_until_exit(tracee, out)
    assert cycles > 5
    assert exc.exit_code == 42
    assert tracee.exit_code == 42
    assert not tracee.alive and not tracee.threads
    assert "exited with status 42" in str(exc)
    # Everything after is ProcessExited too, with the same status; detach is a no-op.
    for call in (tracee.freeze, tracee.wait):
        with pytest.raises(ProcessExited) as again:
            call()
        assert again.value.exit_code == 42
    tracee.detach()
    assert not tracee.attached


PTRACE_EVENT_EXIT = 6
WALL = 0x40000000


def _wait_every_thread_exiting(pid: int) -> None:
    """Until every thread of PID has left the stop we froze it in for its exit stop
    (PTRACE_EVENT_EXIT) or its exit, without taking that stop from the tracer (WNOWAIT)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            info = os.waitid(os.P_PID, int(tid), os.WSTOPPED | os.WEXITED | os.WNOWAIT | WALL)
        except ChildProcessError:
            continue  # gone already
        assert info.si_code != os.CLD_TRAPPED or info.si_status >> 8 == PTRACE_EVENT_EXIT, (tid, info)


@pytest.mark.parametrize("while_frozen,delay", [(False, False), (True, False), (True, True)],
                         ids=["running", "frozen", "frozen-then-wait"])
def test_sigkill_from_outside_during_freeze_thaw_loop(procs, fixture, while_frozen, delay):
    tracee, out = procs.spawn_tracee([fixture("tr_counters"), 8])
    tracee.thaw()
    pump(tracee, lambda: out.search("^ready "), output=out)
    killed = []

    def kill_from_outside(cycle, frozen):
        if cycle == 20 and frozen == while_frozen and not killed:
            # From another process, as a user would.
            subprocess.run(["kill", "-KILL", str(tracee.pid)], check=True)
            killed.append(cycle)
            if delay:
                # Every thread leaves the stop we froze it in for its exit stop, unseen:
                # thaw() then resumes threads from a stop it never reported.
                _wait_every_thread_exiting(tracee.pid)

    exc, cycles = _freeze_thaw_until_exit(tracee, out, kill_from_outside)
    assert killed and cycles >= 20
    assert exc.exit_code == -signal.SIGKILL
    assert tracee.exit_code == -signal.SIGKILL
    assert "killed by signal 9" in str(exc)
    assert not tracee.alive
    assert not os.path.exists(f"/proc/{tracee.pid}")
    tracee.detach()


def test_kill_method_ends_a_frozen_process(procs, fixture):
    tracee, out = procs.spawn_tracee([fixture("tr_counters"), 4])
    tracee.thaw()
    pump(tracee, lambda: out.search("^ready "), output=out)
    tracee.freeze()
    assert tracee.kill() == -signal.SIGKILL
    assert tracee.exit_code == -signal.SIGKILL and not tracee.alive
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{tracee.pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{tracee.pid}")


def test_kill_method_on_an_attached_process(procs, fixture):
    """kill() of a process we attached to and did not start: we see its end through ptrace."""
    pid = procs.detached([fixture("tr_counters"), 4])
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{pid}/task")) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    tracee = procs.attach_tracee(pid)
    tracee.freeze()
    tracee.thaw()
    assert tracee.kill() == -signal.SIGKILL
    assert tracee.exit_code == -signal.SIGKILL and not tracee.alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in "ZX"  # left for its parent to reap
    except (FileNotFoundError, ProcessLookupError):
        pass
