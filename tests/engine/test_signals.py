"""Signals, faults, fork and exec under probes.

- A signal storm (ITIMER_REAL and ITIMER_PROF at 10 kHz, handlers that call the probed
  function themselves) while 8 threads run through a boosted slot: no signal is delivered
  inside a slot (invariant 2: the thread is migrated first), counts stay exact, results right.
- A probed instruction that faults: the program's SA_SIGINFO handler sees the instruction's
  own address in uc_mcontext, never the slot, and siglongjmps out.
- fork while probed: the child runs the probed function untraced with SIGTRAP at its default
  action, and lives; exec drops the probes and the new image runs untouched.
"""
from __future__ import annotations

import pytest

from .conftest import spec_of


def _storm(procs, fixture, threads, iters, hz, **probe_kw):
    run = procs.spawn(fixture("eng_work"), "lea", threads, iters, "storm", hz)
    p = run.proc.probe("w_lea", **probe_kw)
    assert run.finish() == 0, run.text
    res = run.results
    sig = res[("signals",)]
    assert res[("func", "lea")] == {"calls": threads * iters, "bad": 0}
    assert sig["hbad"] == 0 and res[()]["sigtrap"] == 0
    assert sig["outside"] == 0  # no signal interrupted a thread inside a slot (invariant 2)
    assert sig["alrm"] > 100 and sig["alrm"] + sig["prof"] == sig["hcalls"]
    # Every call counts, the handlers' own calls included.
    assert (p.hits, p.missed) == (threads * iters + sig["hcalls"], 0)
    return run, p


def test_signal_storm_through_boosted_slots(procs, fixture):
    run, p = _storm(procs, fixture, 8, 2_000, 10_000)
    assert p.mode == "boosted"
    stats = run.proc.engine.stats
    # Signals that found a thread inside the slot were held, the thread stepped out (migrated)
    # or its step finished, then delivered.
    assert 0 < stats["threads_migrated"] <= stats["signals_held"]


def test_signal_storm_while_stepping(procs, fixture):
    """The same with every hit single-stepped: signals arriving mid-step are held until the
    step is done (2 kHz: at 10 kHz the handlers' own stepped calls leave the workers little
    time, and the run takes tens of seconds)."""
    run, p = _storm(procs, fixture, 4, 1_500, 2_000, boost=False)
    assert p.mode == "stepped"
    assert run.proc.engine.stats["signals_held"] > 0  # some did arrive mid-step


@pytest.mark.parametrize("boost", [True, False])
def test_fault_in_probed_instruction_reports_original_address(procs, fixture, boost):
    exe = fixture("eng_fault")
    threads, iters = 2, 300
    run = procs.spawn(exe, iters, threads)
    load = run.proc.probe("f_load", boost=boost)
    div = run.proc.probe(spec_of(exe, "f_div", "f_div_at"), boost=boost)
    assert run.finish() == 0, run.text
    n = threads * iters
    assert run.results[("fault",)] == {"loads_bad": 0, "segv": n, "fpe": n, "rip_ok": 2 * n,
                                       "rip_bad": 0}, run.text
    assert run.results[()]["sigtrap"] == 0
    assert (load.hits, div.hits) == (2 * n, 2 * n)  # the faulting calls hit the probes too
    assert load.mode == div.mode == ("boosted" if boost else "stepped")
    assert run.proc.engine.stats["faults_in_slots"] == 2 * n


def test_fork_and_exec_while_probed(procs, fixture):
    run = procs.spawn(fixture("eng_fork"), 3_000, 4)
    p = run.proc.probe("w_lea")
    assert run.finish() == 0, run.text
    res = run.results
    assert res[("func", "lea")] == {"calls": 12_000, "bad": 0}
    assert res[("child",)] == {"calls": 3_000, "bad": 0, "exited": 0, "signaled": 0}
    assert res[()]["sigtrap"] == 0
    assert res[("exec",)] == {"calls": 3_000, "bad": 0, "sigtrap": 0}
    # The parent's calls only: not the untraced child's, not the new image's.
    assert p.hits == 12_000
    assert p.removed
    assert run.proc.engine.points == {}
