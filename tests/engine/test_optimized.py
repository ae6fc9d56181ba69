"""Jump-optimised count probes (issue 11): exact counts with no stop per hit, registers, flags
and the red zone untouched, refusals left as breakpoints (opt_count.c, eng_regs.c)."""
from __future__ import annotations

import pytest

from pyprobes import ProbeError

from .conftest import spec_of
from .test_regs import BASE, ITERS

CALLS, THREADS = 200_000, 8


def test_exact_counts_with_eight_threads(procs, fixture):
    """8 threads x 200k calls of a lea-prologue and a push-prologue function, and a leaf whose
    red zone holds live values across the probe: every call counted, every result right."""
    exe = fixture("opt_count")
    run = procs.spawn(exe, CALLS, THREADS)
    proc = run.proc
    lea = proc.probe("opt_lea", action="count")
    push = proc.probe("opt_push", action="count")
    red = proc.probe(spec_of(exe, "opt_red", "opt_red_probe"), action="count")
    assert run.finish() == 0, run.text
    calls = run.results[("calls",)]
    assert calls["bad"] == 0 and run.results[()]["sigtrap"] == 0
    assert calls["lea"] == calls["push"] == calls["red"] == CALLS * THREADS
    for probe, key in ((lea, "lea"), (push, "push"), (red, "red")):
        assert (key, probe.mode, probe.not_optimized) == (key, "optimized", "")
        assert (key, probe.hits, probe.missed) == (key, calls[key], 0)
    stats = proc.engine.optimizer.cache.stats()
    assert stats["slots_used"] == 3 and stats["pages"] == 1


def test_a_refused_region_stays_a_breakpoint(procs, fixture):
    """opt_jmp starts with a jmp: no region fits; the probe is emulated, counts exactly and
    says why it is not optimised."""
    exe = fixture("opt_count")
    run = procs.spawn(exe, 2000, 2)
    proc = run.proc
    jmp = proc.probe("opt_jmp", action="count")
    lea = proc.probe("opt_lea", action="count")
    assert run.finish() == 0, run.text
    calls = run.results[("calls",)]
    assert jmp.mode == "emulated" and "jmp" in jmp.not_optimized
    assert jmp.hits == calls["jmp"] == 2 * 20
    assert lea.mode == "optimized" and lea.hits == calls["lea"] == 4000


def test_no_lahf_in_64_bit_mode_stays_a_breakpoint(procs, fixture, monkeypatch):
    """On a CPU without lahf/sahf in 64-bit mode (the first x86-64 ones) no trampoline is placed:
    the probes stay breakpoints, count exactly and say why."""
    import pyprobes.engine.optimizer as optimizer
    monkeypatch.setattr(optimizer, "flags_saved_by_lahf", lambda: False)
    run = procs.spawn(fixture("opt_count"), 2000, 2)
    proc = run.proc
    lea = proc.probe("opt_lea", action="count")
    assert run.finish() == 0, run.text
    assert lea.mode == "boosted" and "lahf" in lea.not_optimized
    assert lea.hits == run.results[("calls",)]["lea"] == 4000


def test_count_action_takes_no_handlers(procs, fixture):
    run = procs.spawn(fixture("opt_count"), 10, 1)
    proc = run.proc
    with pytest.raises(ProbeError, match="no handlers"):
        proc.probe("opt_lea", action="count", pre=lambda tid, regs: None)
    with pytest.raises(ProbeError, match="unknown probe action"):
        proc.probe("opt_lea", action="bogus")
    with pytest.raises(ProbeError, match="unknown probe action"):  # a return probe's entry, internal
        proc.probe("opt_lea", action="return")
    # A probe with a handler beside a count probe: the point stays a breakpoint.
    counted = proc.probe("opt_push", action="count")
    seen = []
    proc.probe("opt_push", pre=lambda tid, regs: seen.append(tid))
    assert run.finish() == 0
    assert counted.mode == "boosted" and counted.hits == len(seen) == 10


# eng_regs labels probed together (no region holds another probe) -> mode with action="count"
REGS_GROUPS = {
    "a": {"regs_p_lea": "optimized", "regs_p_mov": "optimized", "regs_p_xchg": "optimized",
          "regs_p_pushf": "optimized"},
    "b": {"regs_p_push": "boosted", "regs_p_rip": "optimized", "regs_p_cmov": "boosted",
          "regs_p_popf": "optimized", "regs_p_jcc": "optimized", "regs_p_ret": "boosted"},
}


@pytest.mark.parametrize("action", ["count", "record"])
@pytest.mark.parametrize("group", sorted(REGS_GROUPS))
def test_optimized_probes_leave_registers_and_flags_alone(procs, fixture, group, action):
    """test_regs.py's check (every register, the flags in four patterns, RSP, a RIP-relative
    store) with count or record probes, jump-optimised where a region fits (invariant 7)."""
    exe = fixture("eng_regs")
    run = procs.spawn(exe, ITERS)
    proc = run.proc
    probes = {label: proc.probe(spec_of(exe, "regs_run", label), action=action)
              for label in REGS_GROUPS[group]}
    assert run.finish() == 0, run.text
    assert run.results[("regs",)] == {"iters": ITERS, "bad": 0, "flags_bad": 0, "rsp_bad": 0,
                                      "scratch_bad": 0}, run.text
    assert run.results[()]["sigtrap"] == 0
    for label, mode in REGS_GROUPS[group].items():
        p = probes[label]
        assert (label, p.mode) == (label, mode), p.not_optimized
        assert (label, p.hits, p.missed) == (label, ITERS, 0)
    assert len(BASE) == 15


def test_signals_to_threads_in_trampolines(procs, fixture):
    """SIGUSR1 to 4 threads that spend their time in trampolines: a thread found in one is
    brought out before its signal is delivered (invariant 2), every handler runs, every
    result is right and every call is counted."""
    exe = fixture("opt_count")
    run = procs.spawn(exe, 0, 4, "signals")
    proc = run.proc
    lea = proc.probe("opt_lea", action="count")
    push = proc.probe("opt_push", action="count")
    assert run.finish() == 0, run.text
    calls = run.results[("calls",)]
    usr1 = run.results[("usr1",)]
    assert calls["bad"] == 0 and run.results[()]["sigtrap"] == 0
    assert usr1["sent"] == 8000 and 0 < usr1["got"] <= 8000  # pending SIGUSR1s coalesce
    assert lea.mode == push.mode == "optimized"
    assert (lea.hits, push.hits) == (calls["lea"], calls["push"])
    assert proc.engine.stats["signals_held"] > 0


def test_a_branch_from_another_function_into_the_region(procs, fixture):
    """opt_pcopy ends in a jmp to opt_copy+3, as libc's mempcpy jumps into memcpy: opt_copy's
    region would hold that target, so it stays a breakpoint (with the jmp the program would
    run the patch's int3 padding and die)."""
    exe = fixture("opt_count")
    run = procs.spawn(exe, 2000, 2)
    proc = run.proc
    copy = proc.probe("opt_copy", action="count")
    assert run.finish() == 0, run.text
    assert run.results[("calls",)]["bad"] == 0 and run.results[()]["sigtrap"] == 0
    assert copy.mode == "boosted" and "reaches into" in copy.not_optimized
    assert copy.hits == 2 * 20  # opt_pcopy enters past the probe
