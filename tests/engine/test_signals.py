"""Signals, faults, fork and exec under probes.

- A signal storm (ITIMER_REAL and ITIMER_PROF at 10 kHz, queued SIGRTMIN every 1 ms,
  handlers that call the probed function themselves) while 8 threads run through a boosted
  slot: no signal is delivered inside a slot (invariant 2: the thread is migrated first, the
  handlers check the interrupted RIP), none is lost, counts stay exact, results right.
- A probed instruction that faults: the program's SA_SIGINFO handler sees the instruction's
  own address in uc_mcontext, never the slot, and siglongjmps out.
- fork while probed: the child runs the probed function untraced with SIGTRAP at its default
  action, and lives; exec drops the probes and the new image runs untouched.
"""
from __future__ import annotations

import ctypes
import os
import signal

import pytest

from .conftest import hold_in_boosted_slot, spec_of


def _storm(procs, fixture, threads, seconds, hz, **probe_kw):
    """The workers run until SIGUSR1 after SECONDS: a storm at a wall-clock rate makes a fixed
    amount of work take as long as the machine's load allows, so the run is timed instead."""
    run = procs.spawn(fixture("eng_work"), "lea", threads, 0, "storm", hz)
    p = run.proc.probe("w_lea", **probe_kw)
    run.run_until(r"^ready")
    run.proc.run(timeout=seconds)
    os.kill(run.proc.pid, signal.SIGUSR1)
    assert run.finish() == 0, run.text
    res = run.results
    sig = res[("signals",)]
    calls = res[("func", "lea")]
    assert calls["bad"] == 0 and calls["calls"] > 0  # how many depends on the load of the machine
    assert sig["hbad"] == 0 and res[()]["sigtrap"] == 0
    assert sig["outside"] == 0  # no signal interrupted a thread inside a slot (invariant 2)
    rt = res[("rt",)]
    assert rt["sent"] > 10 and rt["got"] == rt["sent"], run.text  # none lost
    assert sig["alrm"] > 100 and sig["alrm"] + sig["prof"] + rt["got"] == sig["hcalls"]
    # Every call counts, the handlers' own calls included.
    assert (p.hits, p.missed) == (calls["calls"] + sig["hcalls"], 0)
    return run, p


def test_signal_storm_through_boosted_slots(procs, fixture):
    run, p = _storm(procs, fixture, 8, 2.0, 10_000)
    assert p.mode == "boosted"
    stats = run.proc.engine.stats
    # Signals that found a thread inside the slot were held, the thread stepped out (migrated)
    # or its step finished, then delivered.
    assert 0 < stats["threads_migrated"] <= stats["signals_held"]


def test_signal_storm_while_stepping(procs, fixture):
    """The same with every hit single-stepped: signals arriving mid-step are held until the
    step is done."""
    run, p = _storm(procs, fixture, 4, 1.5, 10_000, boost=False)
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


def _tgkill(pid: int, tid: int, sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(234, pid, tid, sig) == 0, ctypes.get_errno()  # SYS_tgkill


@pytest.mark.parametrize("where", ["slot-start", "on-jmp-back", "slot-start-probe-removed"])
def test_signal_for_a_thread_in_a_boosted_slot_is_delivered_once_outside(procs, fixture, where):
    """Two queued signals sent to a thread stopped inside a boosted slot (at its first byte, or
    on its jmp back after the copy ran): the thread is moved out of the slot first, then both
    are delivered -- never lost, never inside the slot. With the probe removed meanwhile the
    thread never stops again, so nothing may wait for a later stop."""
    run = procs.spawn(fixture("eng_work"), "lea", 4, 0)
    proc, tracee = run.proc, run.proc.tracee
    p, held = hold_in_boosted_slot(run, "w_lea")
    tid = held["tid"]
    slot = p.point.slot.address
    if where == "on-jmp-back":
        tracee.step(tid)
        assert slot < tracee.get_rip(tid) < slot + 32
    _tgkill(proc.pid, tid, signal.SIGRTMIN)
    _tgkill(proc.pid, tid, signal.SIGRTMIN)  # queued: both must arrive
    if where == "slot-start-probe-removed":
        p.remove()
    tracee.release(tid)
    proc.run(timeout=0.3)
    os.kill(proc.pid, signal.SIGUSR1)
    assert run.finish() == 0, run.text
    res = run.results
    assert res[("rt",)]["got"] == 2, run.text
    assert res[("signals",)]["outside"] == 0 and res[("signals",)]["hbad"] == 0
    assert res[("func", "lea")]["bad"] == 0 and res[()]["sigtrap"] == 0


def test_signal_held_by_an_injected_syscall_in_a_slot_thread(procs, fixture):
    """A thread stopped inside a boosted slot is the one a system call gets injected into (a
    new slot page mapped near libc) while a signal is pending for it: that signal must still
    reach the program outside the slot, not when the thread is released inside it."""
    run = procs.spawn(fixture("eng_work"), "lea", 4, 0)
    proc, tracee = run.proc, run.proc.tracee
    p, held = hold_in_boosted_slot(run, "w_lea")
    tid = held["tid"]
    slot = p.point.slot.address
    pages = proc.slots.stats()["pages"]
    _tgkill(proc.pid, tid, signal.SIGRTMIN)
    far = proc.probe("libc.so.6:getpid")  # beyond 2 GiB of the first page: maps another
    assert proc.slots.stats()["pages"] == pages + 1
    assert tracee.get_rip(tid) == slot
    tracee.release(tid)
    proc.run(timeout=0.3)
    os.kill(proc.pid, signal.SIGUSR1)
    assert run.finish() == 0, run.text
    res = run.results
    assert res[("rt",)]["got"] == 1, run.text
    assert res[("signals",)]["outside"] == 0, run.text
    assert res[("func", "lea")]["bad"] == 0 and res[()]["sigtrap"] == 0
    assert far.mode in ("boosted", "stepped", "emulated")
