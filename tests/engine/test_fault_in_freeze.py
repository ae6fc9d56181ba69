"""A copied instruction that faulted in its slot while a freeze (detach, garbage collection)
stops the process: the thread is moved back to the original address with the fault still its
own to deliver there; it is never stepped into the fault again (that looped forever: each step
faulted, the signal was held, the step redone).

The fixtures' SIGSEGV handlers check that the faulting RIP they see is the instruction's own
address in the program's text, and siglongjmp out.
"""
from __future__ import annotations

import signal
import time

import pytest
from processes import wait_stop


def _stop_in_the_slot_at_the_fault(proc, spec: str, faulting) -> object:
    """Probe SPEC; at the first boosted hit for which faulting(regs) holds, let the hit path send
    the thread into the slot and make run() return: the copy then faults, and its SIGSEGV stop
    waits for the tracer. Returns the probe."""
    state = {"armed": False}

    def pre(tid, regs):
        if probe.point.boosted and faulting(regs) and not state["armed"]:  # this hit runs boosted
            state["armed"] = True
            state["tid"] = tid
            proc.stop()

    probe = proc.probe(spec, pre=pre)
    deadline = time.monotonic() + 60
    while not state["armed"] and time.monotonic() < deadline:
        assert proc.run(timeout=0.2) is None, "the program ended before the faulting hit"
    assert state["armed"]
    # The copy runs and faults: its stop is there (left for the tracer to take) before we go on.
    assert wait_stop(state["tid"]) == signal.SIGSEGV
    return probe


CASES = {
    # fixture, args, spec, the faulting hit, the program's summary line and what it must say
    "load": ("eng_fault", (2_000, 1), "f_load", lambda regs: regs.rdi == 0,
             ("fault",), {"rip_bad": 0}),
    "push": ("eng_push_fault", (2_000,), "pf_push", lambda regs: regs.rsp & 0xFFF == 0,
             ("fault",), {"rip_bad": 0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_detach_with_a_fault_pending_in_a_slot(procs, fixture, case):
    name, args, spec, faulting, key, want = CASES[case]
    run = procs.spawn(fixture(name), *args)
    _stop_in_the_slot_at_the_fault(run.proc, spec, faulting)
    run.proc.detach()
    assert run.wait_exit(60) == 0, run.text
    got = run.results[key]
    assert {k: got[k] for k in want} == want, run.text


@pytest.mark.parametrize("case", list(CASES))
def test_garbage_collection_with_a_fault_pending_in_the_slot(procs, fixture, case):
    name, args, spec, faulting, key, want = CASES[case]
    run = procs.spawn(fixture(name), *args)
    proc = run.proc
    probe = _stop_in_the_slot_at_the_fault(proc, spec, faulting)
    probe.remove()  # its slot ran boosted: garbage, with the faulted thread still in it
    assert proc.slots.stats()["garbage"] == 1
    proc.slots.collect_garbage()
    assert proc.slots.stats()["garbage"] == 0
    assert run.finish() == 0, run.text
    got = run.results[key]
    assert {k: got[k] for k in want} == want, run.text


def test_boosted_push_fault_is_reported_at_the_original_address(procs, fixture):
    run = procs.spawn(fixture("eng_push_fault"), 300)
    p = run.proc.probe("pf_push")
    assert run.finish() == 0, run.text
    assert p.mode == "boosted" and (p.hits, p.missed) == (600, 0)
    assert run.results[("fault",)] == {"segv": 300, "rip_ok": 300, "rip_bad": 0, "good": 300}
