"""Signals through the tracer: a storm of signals with freezes in between loses none, and a
job-control stop (SIGSTOP from outside) survives freeze/thaw and ends with SIGCONT."""
from __future__ import annotations

import mmap
import os
import signal
import struct
import time

import pytest

from processes import signals_pending
from pyprobes.tracee import EventKind, ProcessExited, ThreadState

from .conftest import drain, expect_exit, proc_state, proc_tids, pump


class Shared:
    """struct shared of tr_sigrecv.c / tr_sigsend.c, read through our own mapping of the file."""

    def __init__(self, region: mmap.mmap) -> None:
        self.region = region

    count = property(lambda self: struct.unpack_from("q", self.region, 0)[0])
    sent = property(lambda self: struct.unpack_from("q", self.region, 8)[0])
    done = property(lambda self: struct.unpack_from("i", self.region, 16)[0])
    ready = property(lambda self: struct.unpack_from("i", self.region, 20)[0])


@pytest.mark.parametrize("mode,nsignals", [("ack", 1000), ("rt", 3000)])
def test_signal_storm_with_freezes_loses_none(procs, fixture, tmp_path, mode, nsignals):
    """ack: SIGUSR1, the sender waits for each to be counted (standard signals coalesce);
    rt: SIGRTMIN, queued, in bursts of up to 64 before waiting for them to be counted."""
    path = tmp_path / "shared"
    path.write_bytes(b"\0" * 4096)
    with open(path, "r+b") as f:
        region = mmap.mmap(f.fileno(), 4096)
    shared = Shared(region)
    try:
        tracee, out = procs.spawn_tracee([fixture("tr_sigrecv"), path])
        tracee.thaw()
        pump(tracee, lambda: shared.ready, output=out)
        delivered = {}

        def count(event):
            if event.kind is EventKind.SIGNAL:
                delivered[event.signal] = delivered.get(event.signal, 0) + 1
            return False

        procs.detached([fixture("tr_sigsend"), tracee.pid, nsignals, mode, path])
        freezes = 0
        deadline = time.monotonic() + 30
        try:
            # The program may finish (and wait() raise) as soon as the sender is done.
            while not shared.done:
                assert time.monotonic() < deadline, f"sender stuck: {shared.count} counted"
                snap = tracee.freeze()
                freezes += 1
                assert snap.tids == proc_tids(tracee.pid)
                tracee.thaw()
                # Handle a few signal stops (at most 20) before the next freeze.
                handled = idle = 0
                while handled < 20 and idle < 5:
                    event = tracee.wait(block=False)
                    if event is None:
                        idle += 1
                        time.sleep(0.0002)
                        continue
                    handled += 1
                    count(event)
                    tracee.handle_default(event)
                out.poll()
            exit_code = expect_exit(tracee)
        except ProcessExited as e:
            exit_code = e.exit_code
        assert shared.sent == nsignals, "the sender could not send them all"
        assert exit_code == tracee.exit_code == 0
        text = out.read_to_eof()
        assert f"received {nsignals} sent {nsignals}" in text
        assert shared.count == nsignals
        assert freezes >= nsignals // 20
        sig = signal.SIGUSR1 if mode == "ack" else signal.SIGRTMIN
        assert delivered.get(sig, 0) > 0
    finally:
        region.close()


def _ready(out):
    m = out.search(r"^ready (0x[0-9a-f]+) (\d+) (0x[0-9a-f]+) (\d+)$")
    return m and (int(m[1], 16), int(m[2]), int(m[3], 16), int(m[4]))


def test_group_stop_survives_freeze_and_ends_with_sigcont(procs, fixture):
    nthreads = 2
    tracee, out = procs.spawn_tracee([fixture("tr_counters"), nthreads])
    tracee.thaw()
    base, stride, stop, n = pump(tracee, lambda: _ready(out), output=out)
    tids = proc_tids(tracee.pid)
    counters = lambda: [tracee.memory.read_u64(base + i * stride) for i in range(n)]  # noqa: E731

    group_stopped = set()

    def on_event(event):
        if event.kind is EventKind.GROUP_STOP:
            assert event.signal == signal.SIGSTOP
            group_stopped.add(event.tid)
        return False

    os.kill(tracee.pid, signal.SIGSTOP)
    pump(tracee, lambda: group_stopped == tids, output=out, on_event=on_event)
    pump(tracee, lambda: all(proc_state(tracee.pid, t) in "tT" for t in tids), output=out)
    assert all(tracee.threads[t].group_stopped for t in tids)
    for _ in range(5):
        snap = tracee.freeze()
        assert snap.tids == tids
        tracee.thaw()
        drain(tracee, on_event)
        before = counters()
        time.sleep(0.05)
        drain(tracee, on_event)
        assert counters() == before, "a thread ran after thaw though the process is stopped"
        assert all(proc_state(tracee.pid, t) in "tT" for t in tids)
    time.sleep(0.2)
    drain(tracee, on_event)
    assert counters() == before

    os.kill(tracee.pid, signal.SIGCONT)
    pump(tracee, lambda: all(a != b for a, b in zip(before, counters())), output=out, on_event=on_event)
    assert not any(t.group_stopped for t in tracee.threads.values())
    assert all(t.state is ThreadState.RUNNING for t in tracee.threads.values())
    # And freeze/thaw works as usual afterwards.
    tracee.freeze()
    tracee.memory.write(stop, (1).to_bytes(4, "little"))
    assert expect_exit(tracee) == 0
    assert f"done threads {nthreads} moved {nthreads}" in out.read_to_eof()


@pytest.mark.parametrize("how", ["step", "inject", "hold"])
def test_signal_arriving_during_a_step_is_delivered_after_thaw(procs, fixture, tmp_path, how):
    """A signal that arrives while the layer single-steps a thread (a step of its own, or an
    injected system call) is held, never delivered mid-step -- and reaches the program once
    the thread runs on after thaw() (or, for a thread held across thaw, after release())."""
    from pyprobes.tracee.ptrace import tgkill
    from pyprobes.tracee.syscalls import SYS_GETPID, inject_syscall

    path = tmp_path / "shared"
    path.write_bytes(b"\0" * 4096)
    with open(path, "r+b") as f:
        region = mmap.mmap(f.fileno(), 4096)
    shared = Shared(region)
    tracee, out = procs.spawn_tracee([fixture("tr_sigrecv"), path])
    tracee.thaw()
    pump(tracee, lambda: shared.ready, output=out)
    [spinner] = proc_tids(tracee.pid) - {tracee.pid}
    delivered = []

    def note(event):
        if event.kind is EventKind.SIGNAL:
            delivered.append(event)
        return False

    tracee.freeze()
    if how == "hold":
        tracee.hold(spinner)
    tgkill(tracee.pid, spinner, signal.SIGUSR1)
    if how in ("step", "hold"):
        for _ in range(5):
            assert tracee.step(spinner).kind is EventKind.SINGLESTEP
    else:
        assert inject_syscall(tracee, spinner, SYS_GETPID) == tracee.pid
    assert [s for s, _ in tracee.threads[spinner].held_signals] == [signal.SIGUSR1]
    assert shared.count == 0, "delivered in the middle of the layer's step"
    tracee.thaw()
    if how == "hold":
        tracee.resume(spinner)  # held: a no-op, which must keep the signal owed
        time.sleep(0.05)
        assert shared.count == 0 and tracee.threads[spinner].held_signals
        tracee.release(spinner)
    pump(tracee, lambda: shared.count == 1, seconds=5, output=out, on_event=note)
    assert not tracee.threads[spinner].held_signals
    # The program ends: one signal "sent", one counted.
    struct.pack_into("q", region, 8, 1)
    struct.pack_into("i", region, 16, 1)
    assert expect_exit(tracee) == 0
    assert "received 1 sent 1" in out.read_to_eof()
    region.close()


def test_sigstop_and_sigcont_arriving_while_frozen(procs, fixture):
    """Job control that happens while every thread is frozen takes effect after thaw."""
    nthreads = 3
    tracee, out = procs.spawn_tracee([fixture("tr_counters"), nthreads])
    tracee.thaw()
    base, stride, stop, n = pump(tracee, lambda: _ready(out), output=out)
    tids = proc_tids(tracee.pid)
    counters = lambda: [tracee.memory.read_u64(base + i * stride) for i in range(n)]  # noqa: E731
    group_stopped = set()

    def on_event(event):
        if event.kind is EventKind.GROUP_STOP:
            group_stopped.add(event.tid)
        return False

    tracee.freeze()
    os.kill(tracee.pid, signal.SIGSTOP)
    # kill() queues it before it returns; it waits, pending, while every thread is frozen.
    assert signal.SIGSTOP in signals_pending(tracee.pid)
    assert all(proc_state(tracee.pid, t) == "t" for t in tids)
    tracee.thaw()
    pump(tracee, lambda: group_stopped == tids, output=out, on_event=on_event)
    pump(tracee, lambda: all(proc_state(tracee.pid, t) in "tT" for t in tids), output=out,
         on_event=on_event)
    before = counters()
    time.sleep(0.1)
    drain(tracee, on_event)
    assert counters() == before

    tracee.freeze()
    os.kill(tracee.pid, signal.SIGCONT)
    assert signal.SIGCONT in signals_pending(tracee.pid)
    assert all(proc_state(tracee.pid, t) == "t" for t in tids)
    tracee.thaw()
    pump(tracee, lambda: all(a != b for a, b in zip(before, counters())), output=out,
         on_event=on_event)
    tracee.freeze()
    tracee.memory.write(stop, (1).to_bytes(4, "little"))
    assert expect_exit(tracee) == 0
    assert f"done threads {nthreads} moved {nthreads}" in out.read_to_eof()
