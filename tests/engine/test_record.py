"""Jump-optimised record probes (issue 11): a record per hit in a shared ring, read by the
tracer with no stop: exact, with the arguments, threads and times the program had (opt_record.c)."""
from __future__ import annotations

from collections import defaultdict

import pytest

from processes import maps, text_differences
from pyprobes import ProbeError

CALLS, THREADS = 50_000, 4
ROUNDS = 100


def drain(run) -> list:
    records = []
    while run.proc.alive:
        run.proc.run(timeout=0.02)
        records += run.proc.records()
    return records + run.proc.records()


def test_every_call_recorded_with_its_arguments_thread_and_time(procs, fixture):
    run = procs.spawn(fixture("opt_record"), CALLS, THREADS)
    proc = run.proc
    proc.ring_capacity = 1 << 18  # every record fits: the count is exact whoever is slow
    probe = proc.probe("rec_f", action="record")
    records = drain(run)
    assert proc.exit_code == 0, run.text
    calls = run.results[("total",)]
    assert calls["bad"] == 0 and calls["calls"] == CALLS * THREADS
    assert probe.mode == "optimized" and probe.hits == CALLS * THREADS
    assert proc.lost_records == 0
    assert len(records) == CALLS * THREADS
    tids = {int(line.split()[3]) for line in run.lines("thread ")}
    per_thread = defaultdict(list)
    for r in records:
        assert r.probe is probe
        i = r.args[0]
        assert r.args == (i, 2 * i, 3 * i, 4 * i, 5 * i, 6 * i)
        per_thread[r.tid].append(r)
    assert set(per_thread) == tids
    for tid, rs in per_thread.items():
        assert [r.args[0] for r in rs] == list(range(1, CALLS + 1))
        times = [r.time_ns for r in rs]
        assert times == sorted(times)


def test_the_main_thread_and_a_breakpoint_record_too(procs, fixture):
    """Records of the main thread (its key learned by a freeze: it had no TLS at our first one),
    and of a probe that stays a breakpoint (the tracer records its hits): exact as well."""
    run = procs.spawn(fixture("opt_record"), 3000, 0)
    proc = run.proc
    probe = proc.probe("rec_f", action="record")
    records = drain(run)
    assert proc.exit_code == 0, run.text
    (tid,) = {int(line.split()[3]) for line in run.lines("thread ")}
    assert probe.mode == "optimized" and probe.hits == len(records) == 3000
    assert {r.tid for r in records} == {tid}
    assert [r.args[0] for r in records] == list(range(1, 3001))

    run = procs.spawn(fixture("opt_count"), 500, 2)
    proc = run.proc
    jmp = proc.probe("opt_jmp", action="record")  # refused: a jmp first
    records = drain(run)
    assert proc.exit_code == 0, run.text
    assert jmp.mode == "emulated" and "jmp" in jmp.not_optimized
    assert jmp.hits == len(records) == run.results[("calls",)]["jmp"] == 2 * 5
    times = [r.time_ns for r in records]
    assert all(r.probe is jmp and r.tid > 0 for r in records)


def test_a_full_ring_drops_and_counts_and_never_blocks(procs, fixture):
    """A 64-record ring nobody drains while the program runs to its end: 64 records kept, the
    rest dropped and counted; the program finishes, every call counted in hits."""
    run = procs.spawn(fixture("opt_record"), 5000, 2)
    proc = run.proc
    proc.ring_capacity = 64
    probe = proc.probe("rec_f", action="record")
    assert run.finish() == 0, run.text
    records = proc.records()
    assert probe.hits == 10_000 == run.results[("total",)]["calls"]
    assert len(records) == 64
    assert proc.lost_records == 10_000 - 64


def test_one_action_per_address(procs, fixture):
    run = procs.spawn(fixture("opt_record"), 10, 1)
    proc = run.proc
    proc.probe("rec_f", action="count")
    with pytest.raises(ProbeError, match="share one action"):
        proc.probe("rec_f", action="record")
    with pytest.raises(ProbeError, match="no handlers"):
        proc.probe("rec_f", action="record", pre=lambda tid, regs: None)
    assert run.finish() == 0


def test_churn_and_detach_while_threads_hammer(procs, fixture):
    """ROUNDS rounds of optimise and unoptimise (disable, enable) while 4 threads hammer a record
    probe: threads in the trampoline or the shared routine are stepped out, every hit is a
    record or a counted drop; detach leaves the text as it was and no page of ours mapped (ring, routine,
    trampolines, counters); the program finishes right."""
    exe = fixture("opt_count")
    run = procs.spawn(exe, 0, 4, stdin_pipe=True)
    proc = run.proc
    lea = proc.probe("opt_lea", action="record")
    run.run_until(r"^ready")
    records = proc.records()
    for _ in range(ROUNDS):
        proc.run(timeout=0.002)
        assert lea.mode == "optimized", lea.not_optimized
        lea.disable()
        records += proc.records()
        lea.enable()
    proc.run(timeout=0.05)
    ring = proc.engine.optimizer.ring
    host = proc.engine.optimizer.host
    ours = set(host.counters) | set(host.counters.values()) | {ring.address, ring.routine}
    assert ring.address and ring.routine
    lea.remove()  # its last records, drained at detach, still name it
    proc.detach()
    records += proc.records()
    # A disable counts no hit after its sync, while the ring still has the records of hits just
    # before the unpatch: records and drops cover the hits, and never exceed the calls.
    made = len(records) + proc.lost_records
    assert len(records) > 0 and lea.hits <= made
    assert all(r.probe is lea and r.tid > 0 for r in records)
    assert text_differences(run.pid, exe) == []
    mapped = maps(run.pid)
    assert not ours & {start for start, _, _, _ in mapped}
    assert not [m for m in mapped if "pyprobes" in m[3]]
    run.close_stdin()
    assert run.wait_exit() == 0, run.text
    calls = run.results[("calls",)]
    assert calls["bad"] == 0 and run.results[()]["sigtrap"] == 0
    assert made <= calls["lea"]
