"""Process life-cycle events under freeze/thaw: vfork, exec from a non-leader thread, a
zombie group leader; attaching to a stopped process; attach/detach over and over while
threads come and go."""
from __future__ import annotations

import os
import signal
import time

import pytest

from pyprobes.tracee import EventKind, Memory, PermissionDenied, ProcessExited, Tracee, TraceeError

from .conftest import drain, expect_exit, proc_state, proc_tids, pump


def _cycle_until_exit(tracee, out, check=None, max_seconds=20.0):
    """Freeze/thaw/drain until the process exits; CHECK(snapshot) on every freeze.
    Returns (ProcessExited, events seen, freezes)."""
    seen = []
    freezes = 0
    deadline = time.monotonic() + max_seconds
    try:
        while True:
            assert time.monotonic() < deadline, f"still running; output {out.text!r}"
            snap = tracee.freeze()
            freezes += 1
            if check:
                check(snap)
            tracee.thaw()
            seen += drain(tracee)
            out.poll()
    except ProcessExited as e:
        return e, seen, freezes


def test_vfork_and_exec_children_under_freeze_thaw(procs, fixture):
    n = 60
    tracee, out = procs.spawn_tracee([fixture("tr_vfork"), n])
    tracee.thaw()
    pump(tracee, lambda: out.search("^ready$"), output=out)

    def check(snap):
        # Threads of the process, or a vforked child sharing its memory until exec/exit.
        task = proc_tids(tracee.pid)
        for tid in snap.tids - task:
            assert tracee.threads[tid].vfork_child, tid

    exc, seen, freezes = _cycle_until_exit(tracee, out, check)
    assert exc.exit_code == 0, out.read_to_eof()
    assert f"spawned {n} ok {n}" in out.read_to_eof()
    kinds = {e.kind for e in seen}
    assert EventKind.VFORK in kinds
    assert not kinds & {EventKind.BREAKPOINT, EventKind.GROUP_STOP}, kinds
    # The only signal is the children's SIGCHLD, delivered to the program.
    assert {e.signal for e in seen if e.kind is EventKind.SIGNAL} <= {signal.SIGCHLD}


def test_exec_from_a_non_leader_thread(procs, fixture):
    tracee, out = procs.spawn_tracee([fixture("tr_exec")])
    tracee.thaw()
    pump(tracee, lambda: out.search("^ready$"), output=out)
    execs = []

    def check(snap):
        assert snap.tids <= proc_tids(tracee.pid)
        execs.extend(e for e in snap.events if e.kind is EventKind.EXEC)

    exc, seen, freezes = _cycle_until_exit(tracee, out, check)
    execs += [e for e in seen if e.kind is EventKind.EXEC]
    assert exc.exit_code == 7
    assert tracee.exec_count == 2
    assert execs and execs[0].tid == tracee.pid  # the exec'ing thread took the leader's tid
    assert execs[0].child != tracee.pid  # ...and the event says which thread it was
    assert out.read_to_eof().endswith(f"after exec pid {tracee.pid} same 1\n")


def test_zombie_leader_spawned(procs, fixture):
    """main() calls pthread_exit: freeze must not wait for the leader, which never stops again."""
    tracee, out = procs.spawn_tracee([fixture("tr_zombie_leader"), 4])
    tracee.thaw()
    m = pump(tracee, lambda: out.search(r"^ready (0x[0-9a-f]+)$"), output=out)
    stop = int(m[1], 16)
    pump(tracee, lambda: proc_state(tracee.pid, tracee.pid) == "Z", output=out)
    for _ in range(20):
        snap = tracee.freeze()
        assert tracee.pid not in snap.tids and len(snap.tids) == 4
        assert snap.tids | {tracee.pid} == proc_tids(tracee.pid)
        tracee.thaw()
        drain(tracee)
    tracee.freeze()
    tracee.memory.write(stop, (1).to_bytes(4, "little"))
    assert expect_exit(tracee) == 0
    assert out.read_to_eof().endswith("\ndone 4\n")


def test_attach_to_a_zombie_leader_is_refused_clearly(procs, fixture):
    """The kernel refuses to attach to an exited main thread: say so, not "permission denied"."""
    proc = procs.start(fixture("tr_zombie_leader"), 3)
    first = proc.wait_output(r"^.*\n")[0]
    stop = int(first.split()[1], 16)
    deadline = time.monotonic() + 10
    while proc_state(proc.pid, proc.pid) != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with pytest.raises(TraceeError, match="main thread has exited") as e:
        Tracee.attach(proc.pid)
    assert not isinstance(e.value, PermissionDenied)
    # Untouched: it finishes normally (its memory reached through a live thread).
    memory = Memory(proc.pid)
    try:
        memory.write(stop, (1).to_bytes(4, "little"))
    finally:
        memory.close()
    code = proc.wait_exit()
    out = proc.output.read_to_eof()[len(first):]
    assert out == "done 3\n"
    assert code == 0


def test_attach_to_a_stopped_process_keeps_it_stopped(procs, fixture):
    proc = procs.start(fixture("tr_counters"), 2)
    first = proc.wait_output(r"^.*\n")[0]
    parts = first.split()
    base, stride, stop = int(parts[1], 16), int(parts[2]), int(parts[3], 16)
    os.kill(proc.pid, signal.SIGSTOP)
    tids = proc_tids(proc.pid)
    deadline = time.monotonic() + 10
    while not all(proc_state(proc.pid, t) == "T" for t in tids):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    tracee = procs.attach_tracee(proc)
    counters = lambda: [tracee.memory.read_u64(base + i * stride) for i in range(2)]  # noqa: E731
    before = counters()
    for _ in range(5):
        snap = tracee.freeze()
        assert snap.tids == tids
        tracee.thaw()
        drain(tracee)
    time.sleep(0.1)
    drain(tracee)
    assert counters() == before, "attaching woke a stopped process"
    tracee.detach()
    time.sleep(0.05)
    assert all(proc_state(proc.pid, t) == "T" for t in tids), "detach woke a stopped process"
    assert counters() == before
    os.kill(proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while counters() == before:
        assert time.monotonic() < deadline, "SIGCONT did not resume it"
        time.sleep(0.005)
    # Stop it the usual way: attach, write the flag, detach.
    tracee = procs.attach_tracee(proc)
    tracee.freeze()
    tracee.memory.write(stop, (1).to_bytes(4, "little"))
    tracee.detach()
    code = proc.wait_exit()
    out = proc.output.read_to_eof()[len(first):]
    assert "done threads 2 moved 2" in out
    assert code == 0


def test_attach_detach_torture_with_thread_churn(procs, fixture):
    """Attach, freeze/thaw a little, detach -- 25 times -- on a program that creates and
    joins threads all the time: it finishes with its correct output."""
    proc = procs.start(fixture("tr_churn"))
    first = proc.wait_output(r"^.*\n")[0]
    stop = int(first.split()[1], 16)
    for round_ in range(25):
        tracee = procs.attach_tracee(proc)
        for _ in range(round_ % 4):
            snap = tracee.freeze()
            assert snap.tids <= proc_tids(proc.pid)
            tracee.thaw()
            drain(tracee)
        if round_ == 24:
            tracee.freeze()
            tracee.memory.write(stop, (1).to_bytes(4, "little"))
        tracee.detach()
        if round_ == 24:
            break  # told to stop: it may be gone already
        with open(f"/proc/{proc.pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
        for tid in proc_tids(proc.pid):
            try:
                assert proc_state(proc.pid, tid) not in "tT", f"thread {tid} left stopped"
            except (FileNotFoundError, ProcessLookupError):
                pass  # exited meanwhile
        time.sleep(0.005)
    code = proc.wait_exit()
    out = proc.output.read_to_eof()[len(first):]
    assert code == 0, out
    created, joined, ran = (int(x) for x in out.split()[1::2])
    assert created == joined == ran > 0


def test_attach_races_with_threads_exiting_as_it_attaches(procs, fixture):
    """Threads that exit the moment they start: attach sees some in /proc/PID/task that are
    already dead (the kernel refuses to seize them). Such a thread must not be waited for."""
    proc = procs.start(fixture("tr_churn"), 0)
    first = proc.wait_output(r"^.*\n")[0]
    stop = int(first.split()[1], 16)
    deadline = time.monotonic() + 4
    rounds = 0
    while rounds < 3000 and time.monotonic() < deadline:
        tracee = Tracee.attach(proc.pid)
        snap = tracee.freeze()
        assert snap.tids <= proc_tids(proc.pid)
        tracee.thaw()
        tracee.detach()
        rounds += 1
    tracee = procs.attach_tracee(proc)
    tracee.freeze()
    tracee.memory.write(stop, (1).to_bytes(4, "little"))
    tracee.detach()
    code = proc.wait_exit()
    out = proc.output.read_to_eof()[len(first):]
    assert code == 0, out
    created, joined, ran = (int(x) for x in out.split()[1::2])
    assert created == joined == ran > 0
    assert rounds > 100
