"""Jump-optimised probes on functions with a call within their first 5 bytes (opt_call.c): the
call, last in the region, runs from the trampoline as push of the original return address and
jmp to the callee. Exact counts from 8 threads, callees and glibc's backtrace() see the
original return address, and unoptimising with threads inside the callee, on the relocated
push or between the push and the jmp leaves every one of them returning right."""
from __future__ import annotations

import signal

from pyprobes.tracee import ptrace

CALLS, THREADS = 100_000, 8
MAX_STEPS = 10_000


def checked(run, backtraces: int = 1) -> dict[str, int]:
    """The fixture's own verdict: every result and return address right, and BACKTRACES
    backtrace() calls from opt_callee that found opt_call's original return address."""
    assert run.finish() == 0, run.text
    calls = run.results[("calls",)]
    assert (calls["bad"], calls["wrong_ret"], calls["bt"]) == (0, 0, backtraces), run.text
    assert run.results[()]["sigtrap"] == 0, run.text
    return calls


def test_exact_counts_with_a_call_in_the_region(procs, fixture):
    run = procs.spawn(fixture("opt_call"), CALLS, THREADS)
    proc = run.proc
    call = proc.probe("opt_call", action="count")
    first = proc.probe("opt_call_first", action="count")
    calls = checked(run)
    assert calls["call"] == CALLS * THREADS + 1 and calls["first"] == CALLS * THREADS
    for probe, key in ((call, "call"), (first, "first")):
        assert (key, probe.mode, probe.not_optimized) == (key, "optimized", "")
        assert (key, probe.hits, probe.missed) == (key, calls[key], 0)
        last = probe.point.optimized.region.instructions[-1]
        assert last.text.startswith("call ")


def test_unoptimise_while_a_thread_is_inside_the_callee(procs, fixture):
    """The main thread blocks in opt_callee, called from opt_call's trampoline; the probe goes
    and its trampoline is collected while it waits; then it returns to opt_call's original code."""
    run = procs.spawn(fixture("opt_call"), 0, 2, "park", stdin_pipe=True)
    proc = run.proc
    run.run_until(r"^ready")
    call = proc.probe("opt_call", action="count")
    proc.run(timeout=0.05)
    assert call.mode == "optimized", call.not_optimized
    run.write("go\n")
    run.run_until(r"^parked")
    hits_before = call.hits
    call.remove()
    assert proc.trampolines.collect_garbage() == 1  # no thread is inside it: the callee's is not
    proc.run(timeout=0.05)
    run.close_stdin()
    calls = checked(run, backtraces=2)  # the parked call's backtrace ran from the trampoline's call
    assert 0 < hits_before <= call.hits <= calls["call"]


def _on_call(run, name: str):
    """A worker held, with SIGUSR1 queued, on the first relocated instruction in the trampoline
    of NAME's probe (moved there from the patched entry; its hit not counted); its tid, the
    probe and its patch. The worker is single-stepped to the entry from original code: a step
    through the action's popfq would leave TF set (finish_action)."""
    proc = run.proc
    tracee = proc.tracee
    run.run_until(r"^ready")
    probe = proc.probe(name, action="count")
    proc.run(timeout=0.05)
    assert probe.mode == "optimized", probe.not_optimized
    opt = probe.point.optimized
    trampoline = opt.trampoline
    for _ in range(100):
        tracee.freeze()
        tid = next((t.tid for t in tracee.threads.values()
                    if t.tid != proc.pid and t.event_pending is None and not t.exiting
                    and not trampoline.address <= tracee.get_rip(t.tid) < trampoline.end), None)
        if tid is not None:
            break
        tracee.thaw()
        proc.run(timeout=0.01)
    else:
        raise AssertionError("no worker stopped outside the trampoline")
    try:
        for _ in range(MAX_STEPS):
            if tracee.get_rip(tid) == opt.region.start:
                break
            tracee.step(tid)
        else:
            raise AssertionError(f"thread {tid} never reached {name}")
        tracee.set_rip(tid, trampoline.relocated[0][0])
        tracee.hold(tid)
        ptrace.tgkill(proc.pid, tid, signal.SIGUSR1)
    finally:
        tracee.thaw()
    return tid, probe, opt


def test_a_thread_on_the_relocated_push_is_mapped_to_the_call(procs, fixture):
    run = procs.spawn(fixture("opt_call"), 0, 2, stdin_pipe=True)
    proc, tracee = run.proc, run.proc.tracee
    tid, probe, opt = _on_call(run, "opt_call")
    push_at, call_address = opt.trampoline.relocated[-1]
    tracee.step(tid)  # sub rsp,8
    assert tracee.get_rip(tid) == push_at
    probe.remove()
    assert tracee.get_rip(tid) == call_address  # the original call, its bytes back
    tracee.release(tid)
    proc.run(timeout=0.05)
    run.close_stdin()
    checked(run)
    assert run.results[("usr1",)]["got"] == 1


def test_a_thread_between_the_push_and_the_jmp_runs_on_into_the_callee(procs, fixture):
    run = procs.spawn(fixture("opt_call"), 0, 2, stdin_pipe=True)
    proc, tracee = run.proc, run.proc.tracee
    tid, probe, opt = _on_call(run, "opt_call")
    push_at, _ = opt.trampoline.relocated[-1]
    tracee.step(tid)  # sub rsp,8
    tracee.step(tid)  # push the original return address
    assert tracee.get_rip(tid) == push_at + 6
    assert opt.trampoline.original_address(push_at + 6) is None
    probe.remove()
    rip = tracee.get_rip(tid)
    assert not opt.trampoline.address <= rip < opt.trampoline.end  # stepped through the jmp
    assert tracee.memory.read_u64(tracee.get_reg(tid, "rsp")) == opt.region.end
    tracee.release(tid)
    assert proc.trampolines.collect_garbage() == 1
    proc.run(timeout=0.05)
    run.close_stdin()
    checked(run)
    assert run.results[("usr1",)]["got"] == 1
