"""freeze()/thaw() on many threads: every thread accounted for, none running while frozen,
all running again after thaw; and a program that creates and joins threads all the time
survives 1,000 freeze/thaw cycles with no lost thread and no stray stop."""
from __future__ import annotations

import os
import signal
import threading
import time

from pyprobes.tracee import EventKind

from .conftest import drain, expect_exit, proc_tids, pump

NTHREADS = 8


def _ready(out):
    m = out.search(r"^ready (0x[0-9a-f]+) (\d+) (0x[0-9a-f]+) (\d+)$")
    if not m:
        return None
    return int(m[1], 16), int(m[2]), int(m[3], 16), int(m[4])


def _counters(tracee, base, stride, n):
    return [tracee.memory.read_u64(base + i * stride) for i in range(n)]


def _check_frozen_counters(tracee, out, base, stride, n):
    """Freeze: the snapshot is exactly /proc's task list and no counter moves over 200 ms;
    thaw: every counter moves again."""
    snap = tracee.freeze()
    assert snap.tids == proc_tids(tracee.pid)
    assert len(snap.tids) == n + 1  # the workers and main, blocked in pthread_join
    assert snap.tids == set(tracee.threads)
    before = _counters(tracee, base, stride, n)
    time.sleep(0.2)
    assert _counters(tracee, base, stride, n) == before, "a counter moved while frozen"
    assert snap.tids == proc_tids(tracee.pid)
    tracee.thaw()
    pump(tracee, lambda: all(a != b for a, b in zip(before, _counters(tracee, base, stride, n))),
         seconds=10, output=out)


def test_freeze_stops_every_thread_and_thaw_restarts_them(procs, fixture):
    tracee, out = procs.spawn_tracee([fixture("tr_counters"), NTHREADS])
    tracee.thaw()
    base, stride, stop, n = pump(tracee, lambda: _ready(out), output=out)
    assert n == NTHREADS
    for _ in range(3):
        _check_frozen_counters(tracee, out, base, stride, n)
    tracee.memory.write(stop, (1).to_bytes(4, "little"))
    assert expect_exit(tracee) == 0
    assert f"done threads {NTHREADS} moved {NTHREADS}" in out.read_to_eof()


def test_freeze_after_attach_to_running_threads(procs, fixture):
    """The same on a process pyprobes attached to, with its 9 threads already running."""
    proc = procs.start(fixture("tr_counters"), NTHREADS)
    line = proc.wait_output(r"^.*\n")[0]
    parts = line.split()
    assert parts[0] == "ready", line
    base, stride, stop = int(parts[1], 16), int(parts[2]), int(parts[3], 16)
    tracee = procs.attach_tracee(proc)
    assert set(tracee.threads) == proc_tids(proc.pid)
    for _ in range(2):
        _check_frozen_counters(tracee, None, base, stride, NTHREADS)
    tracee.freeze()
    tracee.memory.write(stop, (1).to_bytes(4, "little"))
    tracee.detach()
    assert proc.wait_exit() == 0
    out = proc.output.read_to_eof()[len(line):]
    assert f"done threads {NTHREADS} moved {NTHREADS}" in out


# Events a thread-churning program may legitimately report between cycles: all of them
# resumed by the layer itself. Anything else is a stray stop.
_CHURN_EVENTS = {EventKind.CLONE, EventKind.EXITING, EventKind.THREAD_EXIT}


def test_thousand_freeze_thaw_cycles_with_thread_churn(procs, fixture):
    tracee, out = procs.spawn_tracee([fixture("tr_churn")])
    tracee.thaw()
    m = pump(tracee, lambda: out.search(r"^ready (0x[0-9a-f]+)$"), output=out)
    stop = int(m[1], 16)
    stray = []
    clones = 0
    max_threads = 0

    def note(event):
        nonlocal clones
        if event.kind not in _CHURN_EVENTS:
            stray.append(event)
        clones += event.kind is EventKind.CLONE
        return False

    for cycle in range(1000):
        snap = tracee.freeze()
        task = proc_tids(tracee.pid)
        # Every thread stopped is a live thread of the process...
        assert snap.tids <= task, (cycle, snap.tids - task)
        # ...and is exactly the thread table, less threads already past their exit event.
        live = {tid for tid, t in tracee.threads.items() if not t.exiting}
        assert live <= snap.tids <= set(tracee.threads), (cycle, live ^ snap.tids)
        # No lost thread: whatever /proc lists that we did not stop is known and exiting.
        for tid in task - snap.tids:
            assert tid in tracee.threads and tracee.threads[tid].exiting, (cycle, tid)
        # Events that arrived while stopping are in the snapshot and are also handed
        # out by wait() afterwards (counted there, in drain).
        stray.extend(e for e in snap.events if e.kind not in _CHURN_EVENTS)
        max_threads = max(max_threads, len(snap.tids))
        tracee.thaw()
        drain(tracee, note)
        if cycle % 50 == 0:
            # Let the program make progress between some cycles.
            time.sleep(0.002)
            drain(tracee, note)
    assert not stray, stray[:10]
    assert clones > 0 and max_threads > 1, "the program never had more than one thread while frozen"
    tracee.freeze()
    tracee.memory.write(stop, (1).to_bytes(4, "little"))
    assert expect_exit(tracee) == 0
    text = out.read_to_eof()
    m = out.search(r"^created (\d+) joined (\d+) ran (\d+)$")
    assert m, text
    assert int(m[1]) == int(m[2]) == int(m[3]) > 0
    # Every clone we saw was a thread the program created (plus none of ours).
    assert clones <= int(m[1])


def test_wake_from_a_signal_handler_ends_a_blocked_wait(procs, fixture):
    """wait() blocks while the program runs and reports nothing; wake() from a signal
    handler makes it return a WAKE event, and the program runs on undisturbed."""
    tracee, out = procs.spawn_tracee([fixture("tr_counters"), 2])
    tracee.thaw()
    base, stride, stop, n = pump(tracee, lambda: _ready(out), output=out)
    woken = []
    old = signal.signal(signal.SIGUSR2, lambda *_: (woken.append(True), tracee.wake()))
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR2))
    try:
        timer.start()
        event = tracee.wait()
        assert event.kind is EventKind.WAKE
        assert woken == [True]  # it returned for the wake, not before (how soon: python -m bench.wake)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR2, old)
    assert not event.needs_resume
    before = _counters(tracee, base, stride, n)
    pump(tracee, lambda: all(a != b for a, b in zip(before, _counters(tracee, base, stride, n))),
         output=out)
    assert drain(tracee) == []
    tracee.freeze()
    tracee.memory.write(stop, (1).to_bytes(4, "little"))
    assert expect_exit(tracee) == 0
