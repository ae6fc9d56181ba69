"""Jump-optimised probes under torture (issue 11, "Must show"): a thread parked inside a
trampoline when its probe goes, with a signal waiting for it (opt_torture.c); signals held
by a migration never delivered twice nor inside a trampoline; attach/optimise/detach 50 times;
exact counts at 8 threads x 1M calls on a lea and a push prologue. The 10,000-round loop is
tools/optimize_torture.py.

A thread is parked deterministically: with every thread frozen, one is single-stepped until
its RIP is where the test wants it, then held (kept stopped across thaw and run()) with a
SIGUSR1 queued to it. The fixture's SIGUSR1 handler counts a signal frame whose saved RIP is
outside the program's text: a signal delivered inside a trampoline would be one.
"""
from __future__ import annotations

import os
import signal

from iced_x86 import Code, Decoder

from processes import maps, text_differences
from pyprobes.tracee import ptrace

THREADS = 4
MAX_STEPS = 10_000


def traced_stop(pid: int, tid: int) -> None:
    """Wait until TID is in a ptrace stop (state t in /proc), reaped or not."""
    while True:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "t":
                return


def park(proc, where, hold: bool = True, move=None) -> int:
    """Freeze, single-step one worker thread until WHERE(rip) holds, move it to MOVE(rip) if
    given, hold it there (unless not HOLD) and queue SIGUSR1 to it, thaw; its tid. Not held,
    it stops for the signal as it resumes, before it runs another instruction."""
    tracee = proc.tracee
    for _ in range(100):
        tracee.freeze()
        # A worker whose stop the freeze did not queue an event for (all of them may just have
        # trapped on a probe's int3: let those be handled, and freeze again).
        tid = next((t.tid for t in tracee.threads.values()
                    if t.tid != proc.pid and t.event_pending is None and not t.exiting), None)
        if tid is not None:
            break
        tracee.thaw()
        # Handle those hits without run(), whose optimiser would change the very point a test
        # is about to park a thread on.
        while (event := tracee.wait(block=False)) is not None:
            proc.engine.handle(event)
    else:
        raise AssertionError("no worker thread stopped without an event to handle")
    try:
        for _ in range(MAX_STEPS):
            if where(tracee.get_rip(tid)):
                break
            tracee.step(tid)
        else:
            raise AssertionError(f"thread {tid} never reached the place to park")
        if move is not None:
            tracee.set_rip(tid, move(tracee.get_rip(tid)))
        if hold:
            tracee.hold(tid)
        ptrace.tgkill(proc.pid, tid, signal.SIGUSR1)
    finally:
        tracee.thaw()
    if not hold:
        traced_stop(proc.pid, tid)  # its signal stop: reported, not yet reaped
    return tid


def finish(run, proc):
    """Let the program end (stdin closed) and check what it says of itself."""
    run.close_stdin()
    assert run.finish() == 0, run.text
    results = run.results
    calls = results[("calls",)]
    assert calls["bad"] == 0 and results[()]["sigtrap"] == 0, run.text
    assert results[("usr1",)]["outside"] == 0, run.text  # no signal frame in a trampoline
    assert results[("usr1",)]["got"] == 1, run.text  # one sent: delivered once
    return calls


def flags_save(trampoline) -> int:
    """The action's seto: the red zone stepped over and rax pushed, the flags not yet saved."""
    return next(i.ip for i in Decoder(64, trampoline.code, ip=trampoline.address)
                if i.code == Code.SETO_RM8)


def optimized(run, name):
    proc = run.proc
    probe = proc.probe(name, action="count")
    run.run_until(r"^ready")
    proc.run(timeout=0.05)
    assert probe.mode == "optimized", probe.not_optimized
    return probe


def test_thread_parked_in_the_action_when_its_probe_goes(procs, fixture):
    """A thread parked on the action's seto (the red zone stepped over and rax pushed, the flags
    not yet saved) with SIGUSR1 pending: removal steps it out of the action (its hit counted, no
    TF left in its flags), holding the signal; the dirty trampoline is collected; the
    signal is delivered back in original code."""
    run = procs.spawn(fixture("opt_torture"), THREADS, 0, stdin_pipe=True)
    proc = run.proc
    lea = optimized(run, "tort_lea")
    trampoline = lea.point.optimized.trampoline
    region = lea.point.optimized.region
    saving = flags_save(trampoline)
    assert trampoline.in_action(saving)
    tid = park(proc, lambda rip: rip == saving)
    proc.run(timeout=0.05)  # the others run on; the parked one stays
    assert proc.tracee.get_rip(tid) == saving
    lea.remove()
    # through the action and the probed instruction (its hit counted), mapped back after it
    assert proc.tracee.get_rip(tid) == region.end
    stats = proc.trampolines.stats()
    assert stats["garbage"] == 1
    assert proc.trampolines.collect_garbage() == 1
    after = proc.trampolines.stats()
    assert after["collections"] == stats["collections"] + 1 and after["garbage"] == 0
    proc.tracee.release(tid)
    calls = finish(run, proc)
    assert 0 < lea.hits <= calls["lea"]


def test_signal_stop_in_the_action_queued_by_the_removal_freeze(procs, fixture):
    """As above, not held: the thread stops for its SIGUSR1 on the seto, and removal's
    freeze finds that stop (queued for run()). Removal steps it out holding the signal; the
    queued stop is stale by then. The signal is delivered once, in original code."""
    run = procs.spawn(fixture("opt_torture"), THREADS, 0, stdin_pipe=True)
    proc = run.proc
    lea = optimized(run, "tort_lea")
    opt = lea.point.optimized
    saving = flags_save(opt.trampoline)
    tid = park(proc, lambda rip: rip == saving, hold=False)
    lea.remove()
    assert proc.trampolines.collect_garbage() == 1
    calls = finish(run, proc)
    assert 0 < lea.hits <= calls["lea"]


def test_stale_signal_stop_is_not_delivered_again(procs, fixture):
    """As above, and the thread, resumed by the removal with its signal delivered, stops on a
    breakpoint (tort_push, probed with a handler) before run() looks at the queued, stale
    signal stop: that stop must not resume the thread from its breakpoint stop with SIGUSR1
    again (a second delivery, and the int3's trap lost)."""
    run = procs.spawn(fixture("opt_torture"), THREADS, 0, stdin_pipe=True)
    proc = run.proc
    lea = optimized(run, "tort_lea")
    saving = flags_save(lea.point.optimized.trampoline)
    tid = park(proc, lambda rip: rip == saving, hold=False)  # now in its signal stop
    seen = []
    push = proc.probe("tort_push", pre=lambda tid, regs: seen.append(tid))
    lea.remove()
    traced_stop(proc.pid, tid)
    proc.run(timeout=0.05)
    calls = finish(run, proc)
    assert 0 < lea.hits <= calls["lea"] and 0 < push.hits == len(seen) <= calls["push"]


def test_signal_held_by_a_step_out_of_the_slot_is_not_delivered_in_the_trampoline(procs, fixture):
    """A count probe still a breakpoint (queued for the next run()), a thread on its boosted
    copy in the instruction slot, stopped for SIGUSR1. The optimizing freeze steps it out of
    the slot (the step holds the signal) to the region's second instruction: moved on into
    the trampoline, the held signal must not be delivered there (its frame's saved RIP would
    be in the trampoline, which can go while the handler runs)."""
    run = procs.spawn(fixture("opt_torture"), THREADS, 0, stdin_pipe=True)
    proc = run.proc
    run.run_until(r"^ready")
    push = proc.probe("tort_push", action="count")  # int3, queued
    point = push.point
    park(proc, lambda rip: rip == point.address, hold=False, move=lambda rip: point.slot.address)
    for _ in range(10):  # optimised once the thread is out of the region, its signal delivered
        proc.run(timeout=0.02)
        if push.mode == "optimized":
            break
    calls = finish(run, proc)
    assert push.mode == "optimized" and 0 < push.hits <= calls["push"]


def test_thread_parked_in_a_garbage_trampoline_is_migrated_by_the_collection(procs, fixture):
    """The probe goes first; then a thread is put (through the tracee API) on the relocated
    copy of the instruction it stands on in the garbage trampoline, and held there with
    SIGUSR1 pending. The collection's freeze maps it back to the original address before the
    slot is reused, and the signal is delivered there."""
    run = procs.spawn(fixture("opt_torture"), THREADS, 0, stdin_pipe=True)
    proc = run.proc
    push = optimized(run, "tort_push")
    opt = push.point.optimized
    trampoline, region = opt.trampoline, opt.region
    push.remove()  # the trampoline is garbage: unreachable, its bytes still there
    assert proc.trampolines.stats()["garbage"] == 1
    second = region.instructions[1].address  # tort_push's mov, after the push ran
    copy = dict((original, here) for here, original in trampoline.relocated)[second]
    tid = park(proc, lambda rip: rip == second)
    proc.tracee.set_rip(tid, copy)
    proc.run(timeout=0.05)
    stats = proc.trampolines.stats()
    assert proc.tracee.get_rip(tid) == copy and stats["garbage"] == 1
    assert proc.trampolines.collect_garbage() == 1
    after = proc.trampolines.stats()
    assert after["threads_migrated"] == stats["threads_migrated"] + 1
    assert proc.tracee.get_rip(tid) == second
    # The slot is free again: a new probe takes it and the parked thread is not in it.
    lea = proc.probe("tort_lea", action="count")
    proc.run(timeout=0.05)
    assert lea.mode == "optimized" and lea.point.optimized.slot.address == opt.slot.address
    proc.tracee.release(tid)
    calls = finish(run, proc)
    assert 0 < push.hits <= calls["push"] and lea.hits <= calls["lea"]


def test_thread_parked_in_a_garbage_trampoline_at_detach(procs, fixture):
    """Detach with a thread held in a garbage trampoline's relocated part and SIGUSR1 pending:
    it is moved out before the page goes; no page of ours is left, the text is the file's."""
    exe = fixture("opt_torture")
    run = procs.spawn(exe, THREADS, 0, stdin_pipe=True)
    proc = run.proc
    lea = optimized(run, "tort_lea")
    opt = lea.point.optimized
    pages = {opt.slot.page, proc.engine.optimizer.host.counters[opt.slot.page]}
    lea.remove()
    first = opt.region.start
    tid = park(proc, lambda rip: rip == first)
    proc.tracee.set_rip(tid, opt.trampoline.relocated[0][0])
    proc.run(timeout=0.05)
    proc.detach()
    assert not pages & {start for start, _, _, _ in maps(run.pid)}
    assert text_differences(run.pid, exe) == []
    run.close_stdin()
    assert run.wait_exit() == 0, run.text
    results = run.results
    assert results[("calls",)]["bad"] == 0 and results[()]["sigtrap"] == 0
    assert results[("usr1",)] == {"got": 1, "outside": 0, "at": 0}


CALLS, MANY = 1_000_000, 8


def test_exact_counts_eight_threads_a_million_calls(procs, fixture):
    """8 threads x 1M calls each of a lea-prologue and a push-prologue function, both
    optimised before the first call: every call counted, every result right."""
    run = procs.spawn(fixture("opt_torture"), MANY, CALLS)
    proc = run.proc
    lea = proc.probe("tort_lea", action="count")
    push = proc.probe("tort_push", action="count")
    assert run.finish() == 0, run.text
    calls = run.results[("calls",)]
    assert calls == {"lea": CALLS * MANY, "push": CALLS * MANY, "bad": 0}
    assert (lea.mode, push.mode) == ("optimized", "optimized")
    assert (lea.hits, push.hits) == (CALLS * MANY, CALLS * MANY)
    assert lea.missed == push.missed == 0


ATTACH_ROUNDS = 50


def test_attach_optimize_detach_fifty_times(procs, fixture):
    """50 rounds of attach, two count probes jump-optimised, a moment of hits, detach, while 8
    threads call both functions: the process lives, and after every detach the text is the
    file's and no page pyprobes mapped is left (only the program's own mappings remain)."""
    import pyprobes

    exe = fixture("opt_torture")
    run = procs.start(exe, MANY, 0)
    run.wait_output(r"^ready")
    before = {start for start, _, _, _ in maps(run.pid)}
    ours: set[int] = set()
    for i in range(ATTACH_ROUNDS):
        proc = run.proc = pyprobes.attach(run.pid)
        probes = [proc.probe(name, action="count") for name in ("tort_lea", "tort_push")]
        for _ in range(100):  # a thread in a region, or no hit yet: optimised at the next run()
            proc.run(timeout=0.01)
            if all(p.mode == "optimized" and p.hits for p in probes):
                break
        assert [p.mode for p in probes] == ["optimized", "optimized"], (i, [p.not_optimized for p in probes])
        counters = proc.engine.optimizer.host.counters
        ours |= set(counters) | set(counters.values()) | {start for start, _, _, _ in maps(run.pid)} - before
        proc.detach()
        run.proc = None
        assert all(p.hits > 0 for p in probes), i  # counted while optimised, synced at detach
        assert text_differences(run.pid, exe) == [], i
        assert not ours & {start for start, _, _, _ in maps(run.pid)}, i
    assert {start for start, _, _, _ in maps(run.pid)} == before
    worker = max(int(tid) for tid in os.listdir(f"/proc/{run.pid}/task"))
    ptrace.tgkill(run.pid, worker, signal.SIGUSR1)  # the handler's check runs once at least
    run.close_stdin()
    assert run.wait_exit() == 0, run.text
    results = run.results
    assert results[("calls",)]["bad"] == 0 and results[()]["sigtrap"] == 0
    assert results[("usr1",)] == {"got": 1, "outside": 0, "at": 0}


def test_thread_parked_in_a_return_probes_entry_routine_when_its_probe_goes(procs, fixture):
    """A thread parked inside the entry routine an in-process return probe's trampoline calls
    (its return address in that trampoline) when the probe goes: removal runs it out of the
    routine and the trampoline before the trampoline is garbage, so the collection that frees
    it cannot pull the code from under the thread; the program runs on and its call returns."""
    run = procs.spawn(fixture("opt_torture"), THREADS, 0, stdin_pipe=True)
    proc = run.proc
    run.run_until(r"^ready")
    rp = proc.return_probe("tort_lea", action="count")
    proc.run(timeout=0.05)
    assert rp.mode == "optimized", rp.not_optimized
    inprocess = proc.engine.returns.inprocess
    entry, trampoline = inprocess.entry_routine, inprocess.trampoline
    tid = park(proc, lambda rip: entry < rip < trampoline)  # past the routine's first instruction
    rp.remove()
    rip = proc.tracee.get_rip(tid)
    assert not proc.engine.optimizer.contains(rip), hex(rip)  # neither routine nor trampoline
    assert proc.trampolines.collect_garbage() == 1
    proc.tracee.release(tid)
    calls = finish(run, proc)
    assert 0 < rp.hits <= calls["lea"]


def test_thread_on_the_first_relocated_instruction_when_the_point_is_a_breakpoint_again(procs, fixture):
    """A thread parked on the trampoline's first relocated instruction (its hit counted by the
    action) when a probe with a handler joins the point, which goes back to an int3 under the
    same freeze: the thread runs that instruction where it is, not again under the int3, so
    the count stays exact (one more otherwise)."""
    run = procs.spawn(fixture("opt_torture"), THREADS, 0, stdin_pipe=True)
    proc = run.proc
    lea = optimized(run, "tort_lea")
    trampoline = lea.point.optimized.trampoline
    first = trampoline.address + trampoline.relocated_offset
    tid = park(proc, lambda rip: rip == first)
    seen = []
    proc.probe("tort_lea", pre=lambda tid, regs: seen.append(tid))  # the point: a breakpoint again
    assert lea.mode != "optimized" and not trampoline.address <= proc.tracee.get_rip(tid) < trampoline.end
    proc.tracee.release(tid)
    calls = finish(run, proc)
    assert lea.hits == calls["lea"] and 0 < len(seen) < lea.hits
