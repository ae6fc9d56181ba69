"""Detach while threads are blocked in read() inside probed functions: every hijacked return
address is written back, so each thread later returns to its real caller, untraced; the text is
the file's again and the trampoline page is gone."""
from __future__ import annotations

import os
import time

from .conftest import maps, text_differences


def _in_read(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            return f.read().split()[0] == "0"  # read(2), blocked
    except (OSError, IndexError):
        return False


def test_detach_with_threads_blocked_in_probed_reads(procs, fixture):
    exe = fixture("ret_block")
    run = procs.spawn(exe, stdin_pipe=True)
    proc = run.proc
    returns = proc.engine.returns
    reported = []
    rps = [proc.return_probe(name, lambda tid, v, ns, d: reported.append(d), entry=lambda tid, regs, n=name: n)
           for name in ("outer", "read_line")]
    run.run_until("^ready$")
    deadline = time.monotonic() + 20
    while True:
        tids = [int(t) for t in os.listdir(f"/proc/{run.pid}/task")]
        if len(tids) == 2 and all(_in_read(run.pid, t) for t in tids) \
                and all(len(returns.stacks.get(t, ())) == 2 for t in tids):
            break
        assert time.monotonic() < deadline, (tids, {t: len(s) for t, s in returns.stacks.items()})
        proc.run(timeout=0.02)
    trampoline = returns.trampoline
    assert trampoline is not None
    assert any(start <= trampoline < end for start, end, _, _ in maps(run.pid))
    assert [(rp.hits, rp.dropped) for rp in rps] == [(0, 0), (0, 0)]

    proc.detach()

    assert not proc.tracee.attached
    # Nothing of ours is left: the file's text, no trampoline page, no tracer.
    assert text_differences(run.pid, exe) == []
    assert not any(start <= trampoline < end for start, end, _, _ in maps(run.pid))
    with open(f"/proc/{run.pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()
    assert reported == []  # the blocked calls never returned while traced

    run.write(b"hello\n")
    assert run.wait_exit() == 0, run.text
    assert run.text.splitlines() == [
        "ready",
        "caller_a got hello outer 1005",
        "caller_b got relay:hello outer 2011",
        "done",
    ]


def test_detach_at_the_entry_of_a_hijacked_call(procs, fixture):
    """Detach while the thread is stopped at the entry of nap(), whose return address was just
    hijacked; before that, 56 calls returned through the trampoline."""
    exe = fixture("ret_values")
    run = procs.spawn(exe)
    proc = run.proc
    returns = proc.engine.returns
    rps = [proc.return_probe(name, None) for name in ("ret_int", "ret_ptr", "ret_double", "nap")]

    def at_nap(tid, regs):
        proc.tracee.hold(tid)  # keep it right here until the detach
        proc.stop()

    proc.probe("nap", pre=at_nap)
    assert proc.run() is None
    assert [rp.hits for rp in rps] == [40, 8, 8, 0]
    assert len(returns.stacks[run.pid]) == 1  # nap's frame, hijacked
    trampoline = returns.trampoline
    proc.detach()
    assert text_differences(run.pid, exe) == []
    assert not any(start <= trampoline < end for start, end, _, _ in maps(run.pid))
    assert run.wait_exit() == 0, run.text
    assert run.text.endswith("nap ms 10 got 11\n" * 3 + "done\n")
