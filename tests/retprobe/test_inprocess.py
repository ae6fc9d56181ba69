"""Return probes followed inside the process (issue 12, engine/inprocess_returns.py): the same
results as the stop-based return probes (the other files here), now with no stop per call.

Each test checks first that the probes are in-process (mode "optimized"), then what the
stop-based tests check: exact counts, longjmp and C++ exceptions through probed frames, the
depth limit, return values, registers at return, fork and detach."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from pyprobes import ReturnRecord
from pyprobes.x86.shadow import THREAD_DEPTH, claimed_entries, thread_frames

from .conftest import maps, text_differences
from .test_unwind import N as THROW_N, expected as throw_expected


def _in_process(proc, *rps) -> None:
    proc.optimize()
    for rp in rps:
        assert rp.mode == "optimized", (rp, rp.not_optimized)


def _run_recording(run) -> list:
    """Run the fixture to its end, draining the records as it goes; none may be lost."""
    proc, records = run.proc, []
    while True:
        code = proc.run(timeout=0.05)
        records += proc.records()
        if code is not None:
            break
    assert code == 0, run.text
    records += proc.records()
    assert proc.lost_records == 0
    return records


def _calls(text: str) -> tuple[int, int, int]:
    m = re.search(r"^calls sq (\d+) outer (\d+) bad (\d+)$", text, re.M)
    assert m, text
    return tuple(map(int, m.groups()))


def test_exact_counts_8_threads_100k_calls(procs, fixture):
    n, threads = 100_000, 8
    run = procs.spawn(fixture("ret_inproc"), n, threads)
    proc = run.proc
    outer = proc.return_probe("ret_outer", action="hist")
    sq = proc.return_probe("ret_sq%return", action="count")
    _in_process(proc, outer, sq)
    assert proc.run() == 0, run.text
    calls = n * threads
    assert _calls(run.text) == (calls, calls, 0)
    assert (outer.hits, outer.missed, outer.dropped) == (calls, 0, 0)
    assert (sq.hits, sq.missed, sq.dropped) == (calls, 0, 0)
    assert outer.entry_probe.hits == calls  # no call went the stop-based way
    hist = outer.histogram
    assert hist.count == sum(hist.buckets) == calls
    assert 0 <= hist.percentile(50) <= hist.percentile(99) <= outer.max_latency_ns == hist.max


def test_return_values_and_arguments_recorded(procs, fixture):
    n, threads = 3000, 2
    run = procs.spawn(fixture("ret_inproc"), n, threads)
    proc = run.proc
    sq = proc.return_probe("ret_sq", action="record")
    _in_process(proc, sq)
    records = _run_recording(run)
    returns = [r for r in records if isinstance(r, ReturnRecord)]
    assert len(returns) == n * threads == sq.hits
    assert all(r.probe is sq for r in returns)
    # ret_sq(x) = x*x + 7, called with x = 1..n by each thread: its argument seen at entry,
    # its result at return, exactly
    assert all(r.retval == r.args[0] * r.args[0] + 7 for r in returns)
    assert sorted(r.args[0] for r in returns) == sorted(list(range(1, n + 1)) * threads)
    assert len({r.tid for r in returns}) == threads and run.pid not in {r.tid for r in returns}
    assert all(0 <= r.latency_ns < 10**9 for r in returns)


def test_entry_records_and_return_records_share_one_trampoline(procs, fixture):
    """A record probe and a record return probe on one function (`trace f f%return`): one
    trampoline, whose entry routine appends the entry records too, no stop; each call an entry
    record then its return record, in time order per thread. Removing the record probe leaves
    the return probe in the process, with no entry record after."""
    n, threads = 3000, 2
    run = procs.spawn(fixture("ret_inproc"), n, threads)
    proc = run.proc
    proc.ring_capacity = 1 << 16  # every record fits: none lost between two drains
    entry = proc.probe("ret_sq", action="record")
    sq = proc.return_probe("ret_sq", action="record")
    _in_process(proc, sq)
    assert entry.mode == "optimized" and entry.point is sq.entry_probe.point
    records = _run_recording(run)
    calls = n * threads
    entries = [r for r in records if not isinstance(r, ReturnRecord)]
    returns = [r for r in records if isinstance(r, ReturnRecord)]
    assert entry.hits == sq.hits == len(entries) == len(returns) == calls
    assert all(r.probe is entry for r in entries) and all(r.probe is sq for r in returns)
    assert sorted(r.args[0] for r in entries) == sorted(list(range(1, n + 1)) * threads)
    for tid in {r.tid for r in records}:
        mine = sorted((r for r in records if r.tid == tid), key=lambda r: r.time_ns)
        assert [type(r) is ReturnRecord for r in mine] == [False, True] * (len(mine) // 2)
        assert all(a.args[0] == b.args[0] for a, b in zip(mine[::2], mine[1::2]))


def test_count_probe_beside_a_return_probe_stays_optimized(procs, fixture):
    """`count f f%return`: the return probe's entry trampoline counts every call for both."""
    n, threads = 20_000, 4
    run = procs.spawn(fixture("ret_inproc"), n, threads)
    proc = run.proc
    counted = proc.probe("ret_outer", action="count")
    outer = proc.return_probe("ret_outer", action="count")
    _in_process(proc, outer)
    assert counted.mode == "optimized"
    assert proc.run() == 0, run.text
    assert counted.hits == outer.hits == n * threads == _calls(run.text)[1]


def test_removing_the_record_probe_beside_a_return_probe(procs, fixture):
    """The point's trampoline is made again for what is left: the return probe alone, still in
    the process, and no entry record of the removed probe after its removal."""
    n, threads = 200_000, 2
    run = procs.spawn(fixture("ret_inproc"), n, threads)
    proc = run.proc
    entry = proc.probe("ret_sq", action="record")
    sq = proc.return_probe("ret_sq", action="count")
    _in_process(proc, sq)
    proc.run(timeout=0.05)
    entry.remove()
    proc.records()  # what it recorded before
    code = proc.run()
    assert code == 0, run.text
    assert sq.mode == "optimized"
    assert [r for r in proc.records() if r.probe is entry] == []
    assert sq.hits == n * threads


def test_vfork_child_on_its_parents_shadow_stack(procs, fixture):
    """A vfork child without a TLS of its own (clone CLONE_VM|CLONE_VFORK) runs on its parent
    thread's shadow stack, with a stack pointer above the parent's frames: its call drops them
    as dead and pushes its own. The parent's entry is given back as it was when the child is
    done (VFORK_DONE): the parent's return finds its frame (ud2, SIGILL, before), and the
    child's drop is not counted."""
    rounds = 3
    run = procs.spawn(fixture("ret_vfork"), rounds)
    proc = run.proc
    outer = proc.return_probe("outer", action="count")
    inner = proc.return_probe("inner", action="count")
    _in_process(proc, outer, inner)
    assert proc.run() == 0, run.text
    assert run.text.splitlines() == [f"round {r} got {r + 1}" for r in range(rounds)] + ["done"]
    assert (outer.hits, outer.missed, outer.dropped) == (rounds, 0, 0)
    assert (inner.hits, inner.missed, inner.dropped) == (rounds, 0, 0)


def test_recursion_past_the_depth_limit(procs, fixture):
    depth, rounds = 200, 3
    run = procs.spawn(fixture("ret_recurse"), depth, rounds)
    proc = run.proc
    rp = proc.return_probe("rec", action="count")
    assert rp.maxactive == 64
    _in_process(proc, rp)
    assert proc.run() == 0, run.text
    calls = depth + 1
    got = re.findall(r"^round \d+ got (\d+) calls (\d+)$", run.text, re.M)
    assert [(int(v), int(c)) for v, c in got] == [(depth * (depth + 1) // 2, calls)] * rounds
    assert (rp.hits, rp.missed, rp.dropped) == (64 * rounds, (calls - 64) * rounds, 0)


def test_a_depth_the_area_does_not_have_is_followed_with_stops(procs, fixture):
    run = procs.spawn(fixture("ret_recurse"), 50, 2)
    proc = run.proc
    rp = proc.return_probe("rec", action="count", maxactive=10)
    proc.optimize()
    assert rp.mode != "optimized" and "maxactive 10" in rp.not_optimized
    assert proc.run() == 0, run.text
    assert (rp.hits, rp.missed, rp.dropped) == (10 * 2, 41 * 2, 0)


def test_longjmp_out_of_five_probed_frames(procs, fixture):
    threads, iterations, levels = 4, 20_000, 5
    run = procs.spawn(fixture("ret_longjmp"), threads, iterations)
    proc = run.proc
    rps = [proc.return_probe(f"f{k}", action="count") for k in range(1, levels + 1)]
    check = proc.return_probe("check", action="count")
    _in_process(proc, *rps, check)
    assert proc.run() == 0, run.text
    lines = re.findall(r"^thread (\d+) iterations (\d+) good (\d+) checks (\d+)$", run.text, re.M)
    assert sorted(lines) == [(str(t), *[str(iterations)] * 3) for t in range(threads)]
    for rp in rps:  # never returned: dropped at check()'s entry, the last ones at thread exit
        assert (rp.hits, rp.missed, rp.dropped) == (0, 0, threads * iterations), rp
    assert (check.hits, check.missed, check.dropped) == (threads * iterations, 0, 0)


def test_cxx_exception_through_probed_frames(procs, fixture):
    run = procs.spawn(fixture("ret_throw.cpp"), THROW_N)
    proc = run.proc
    rps = {name: proc.return_probe(name, action="count") for name in ("t1", "t2", "t3", "note")}
    _in_process(proc, *rps.values())
    assert proc.run() == 0, run.text  # not -SIGABRT: the unwinder read real return addresses
    want = throw_expected(THROW_N)
    m = re.search(r"^result sum (-?\d+) returned (\d+) rethrown (\d+) notes (\d+)$", run.text, re.M)
    assert m, run.text
    assert tuple(map(int, m.groups())) == (want["sum"], want["returned"], want["rethrown"], want["notes"])
    throws = want["throws"]
    for name in ("t1", "t2", "t3"):
        assert (rps[name].hits, rps[name].missed, rps[name].dropped) == (THROW_N - throws, 0, throws)
    assert (rps["note"].hits, rps["note"].missed, rps["note"].dropped) == (THROW_N, 0, 0)


def test_probed_return_changes_only_rip(procs, fixture):
    rounds = 2000
    run = procs.spawn(fixture("ret_clobber"), rounds)
    proc = run.proc
    rps = [proc.return_probe(name, action="count") for name in ("clob", "clob_nop")]
    _in_process(proc, *rps)
    assert proc.run() == 0, run.text
    m = re.search(r"^rounds (\d+) bad_in (\d+) bad_out (\d+) bad_rsp (\d+) bad_redzone (\d+) bad_xmm (\d+)$",
                  run.text, re.M)
    assert m, run.text
    # rax, rdx, xmm0/xmm1, the flags, rsp and the red zone as the function left them
    assert tuple(map(int, m.groups())) == (rounds, 0, 0, 0, 0, 0)
    assert [(rp.hits, rp.missed, rp.dropped) for rp in rps] == [(rounds // 2, 0, 0)] * 2


def test_fork_inside_probed_frames(procs, fixture):
    rounds = 4
    run = procs.spawn(fixture("ret_fork"), rounds)
    proc = run.proc
    forker = proc.return_probe("forker", action="count")
    # a depth other than the area's keeps it stop-based: frames of both kinds across the fork
    outer = proc.return_probe("outer", action="count", maxactive=32)
    _in_process(proc, forker)
    assert outer.mode != "optimized" and outer.not_optimized
    assert proc.run() == 0, run.text
    lines = run.text.splitlines()
    assert lines[-1] == "done"
    for r in range(rounds):
        assert f"child {r} outer {r * 10 + 101}" in lines, run.text
        assert f"parent {r} outer {r * 10 + 102} child-status 0" in lines, run.text
    assert [(rp.hits, rp.missed, rp.dropped) for rp in (forker, outer)] == [(rounds, 0, 0)] * 2


def _in_read(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            return f.read().split()[0] == "0"
    except (OSError, IndexError):
        return False


def test_detach_with_threads_inside_probed_calls(procs, fixture):
    exe = fixture("ret_block")
    run = procs.spawn(exe, stdin_pipe=True)
    proc = run.proc
    inprocess = proc.engine.returns.inprocess
    rps = [proc.return_probe(name, action="count") for name in ("outer", "read_line")]
    _in_process(proc, *rps)
    run.run_until("^ready$")
    deadline = time.monotonic() + 20
    while True:
        tids = [int(t) for t in os.listdir(f"/proc/{run.pid}/task")]
        if len(tids) == 2 and all(_in_read(run.pid, t) for t in tids) \
                and all(rp.entry_probe.hits == 2 for rp in rps):
            break
        assert time.monotonic() < deadline, [rp.entry_probe.hits for rp in rps]
        proc.run(timeout=0.02)
    code, area = inprocess.code, inprocess.area
    assert code and area
    assert sum(len(frames) for frames in thread_frames(inprocess.view, inprocess.layout).values()) == 4
    proc.detach()
    assert text_differences(run.pid, exe) == []
    assert not any(start <= code < end or start <= area < end for start, end, _, _ in maps(run.pid))
    with open(f"/proc/{run.pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()
    run.write(b"hello\n")
    assert run.wait_exit() == 0, run.text
    assert run.text.splitlines() == [
        "ready",
        "caller_a got hello outer 1005",
        "caller_b got relay:hello outer 2011",
        "done",
    ]


def test_a_fault_in_the_return_trampoline_reaches_the_program(procs, fixture):
    """A fault raised by the routines' own code (here the return trampoline's ud2, its frame
    taken away under it) is delivered to the program where it happened: migration does not
    single-step the faulting instruction forever (the tracer hung before)."""
    run = procs.spawn(fixture("ret_block"), stdin_pipe=True)
    proc = run.proc
    inprocess = proc.engine.returns.inprocess
    rps = [proc.return_probe(name, action="count") for name in ("outer", "read_line")]
    _in_process(proc, *rps)
    run.run_until("^ready$")
    deadline = time.monotonic() + 20
    while not all(rp.entry_probe.hits == 2 for rp in rps):
        assert time.monotonic() < deadline, [rp.entry_probe.hits for rp in rps]
        proc.run(timeout=0.02)
    for index in claimed_entries(inprocess.view, inprocess.layout).values():  # the frames go
        at = inprocess.layout.thread_offset(index) + THREAD_DEPTH
        inprocess.view[at:at + 8] = bytes(8)
    run.write(b"hello\n")
    while proc.alive:
        proc.run(timeout=0.5)
    assert proc.exit_code == -signal.SIGILL, run.text  # the ud2's, where it happened


def test_probe_pages_of_removed_probes_are_used_again(procs, fixture):
    """More in-process return probes placed and removed, one after another, than there are probe
    pages (a library dlopened and dlclosed again and again): each still in the process, each
    count its own (every call it followed returned into its statistics, none from a probe
    before it on the page); a removed one keeps its last statistics."""
    run = procs.spawn(fixture("ret_inproc"), 50_000_000, 1)
    proc = run.proc
    pages = proc.engine.returns.inprocess.layout.probes
    proc.run(timeout=0.1)  # past the program's start: its calls have begun
    placed = []
    for _ in range(pages + 3):
        rp = proc.return_probe("ret_outer", action="hist")
        _in_process(proc, rp)
        proc.run(timeout=0.005)
        rp.remove()
        placed.append(rp)
    assert len({rp.shadow_id for rp in placed}) <= pages
    proc.run(timeout=0.01)  # the last calls in flight return
    for rp in placed:
        assert rp.hits == rp.entry_probe.hits == rp.histogram.count, rp
    assert sum(rp.hits for rp in placed) > 0
    proc.kill()


def test_unknown_action_is_refused(procs, fixture):
    run = procs.spawn(fixture("ret_inproc"), 1, 1)
    with pytest.raises(Exception, match="unknown return probe action"):
        run.proc.return_probe("ret_sq", action="sum")
    with pytest.raises(Exception, match="no handlers"):
        run.proc.return_probe("ret_sq", lambda *a: None, action="count")


def test_detach_while_8_threads_call_probed_functions(procs, fixture):
    """Detach mid-run: threads anywhere (in a trampoline, the entry routine, the return
    trampoline, between) are stepped out, every hijacked slot gets its caller back, and the
    program finishes with every value right."""
    exe = fixture("ret_inproc")
    run = procs.spawn(exe, 3_000_000, 8)
    proc = run.proc
    rps = [proc.return_probe("ret_outer", action="hist"), proc.return_probe("ret_sq", action="count")]
    _in_process(proc, *rps)
    for _ in range(3):
        proc.run(timeout=0.1)
    assert all(rp.hits > 0 for rp in rps)
    code, area = proc.engine.returns.inprocess.code, proc.engine.returns.inprocess.area
    proc.detach()
    assert text_differences(run.pid, exe) == []
    assert not any(start <= code < end or start <= area < end for start, end, _, _ in maps(run.pid))
    assert run.wait_exit() == 0, run.text
    assert _calls(run.text) == (24_000_000, 24_000_000, 0)
