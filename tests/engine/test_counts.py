"""Exact counts (invariant 4): 8 threads hammer a probed function; the probe's hits equal the
program's own count of calls, for each way a probed instruction is executed.

Sizes: 8 threads x 8,000 calls for one-stop probes (boosted, emulated) and 8 x 5,000 for
two-stop (stepped) ones, about 2-4 s each on 2 cores at 30-90 us per hit; the issue's
8 x 100,000 would take 25-70 s per test.
"""
from __future__ import annotations

import pytest

from .conftest import spec_of

THREADS = 8
ONE_STOP = 8_000
TWO_STOPS = 5_000


def _check_run(run, func: str, per_thread: int) -> int:
    assert run.finish() == 0, run.text
    res = run.results
    calls = res[("func", func)]
    assert calls == {"calls": THREADS * per_thread, "bad": 0}, run.text
    assert res[()]["sigtrap"] == 0
    return calls["calls"]


def test_boosted_probe_counts_every_call(procs, fixture):
    run = procs.spawn(fixture("eng_work"), "lea", THREADS, ONE_STOP)
    p = run.proc.probe("w_lea")
    # What a hit will do: boosted. As in the seed, the first hit still runs stepped: the point
    # is boosted after a clean step.
    assert p.mode == "boosted" and not p.point.boosted
    calls = _check_run(run, "lea", ONE_STOP)
    assert p.mode == "boosted"
    assert (p.hits, p.missed) == (calls, 0)
    stats = run.proc.slots.stats()
    assert stats["slots_used"] == 1 and stats["pages"] == 1


def test_emulated_probe_counts_every_call(procs, fixture):
    """w_call starts with `call rel32`: emulated, the tracer writes the return address on the
    stack and sets RSP and RIP; the callee's result and w_call's own `ret` prove both right."""
    run = procs.spawn(fixture("eng_work"), "call", THREADS, ONE_STOP)
    seen = {"pre": 0, "bad_rip": 0}

    def pre(tid, regs):
        seen["pre"] += 1
        if regs.rip != p.address:
            seen["bad_rip"] += 1

    p = run.proc.probe("w_call", pre=pre)
    assert p.mode == "emulated"
    calls = _check_run(run, "call", ONE_STOP)
    assert (p.hits, p.missed) == (calls, 0)
    assert seen == {"pre": calls, "bad_rip": 0}
    assert run.proc.slots.stats()["slots_used"] == 0  # an emulated probe needs no slot


def test_emulated_probe_without_handler_counts_every_call(procs, fixture):
    """The same without a pre-handler (the hit path's shortest way for an emulation that
    writes memory)."""
    run = procs.spawn(fixture("eng_work"), "call", THREADS, ONE_STOP)
    p = run.proc.probe("w_call")
    calls = _check_run(run, "call", ONE_STOP)
    assert p.mode == "emulated"
    assert (p.hits, p.missed) == (calls, 0)


@pytest.mark.parametrize("boost", [True, False])
def test_push_reg_probe_counts_every_call(procs, fixture, boost):
    """`push rbx` runs as a copy in a slot (boosted after its first clean step; stepped
    throughout with boost=False): w_push returns x+5 only if the pushed value is rbx's and
    its own `pop` and `ret` find the stack where they left it. The pre-handler sees the
    registers before the push: RSP 8 higher than the stored value's address."""
    per_thread = ONE_STOP if boost else TWO_STOPS
    run = procs.spawn(fixture("eng_work"), "push", THREADS, per_thread)
    seen = {"pre": 0, "bad": 0}

    def pre(tid, regs):
        seen["pre"] += 1
        if regs.rip != p.address or regs.rsp % 16 != 8:  # just called: RSP = 16n - 8
            seen["bad"] += 1

    p = run.proc.probe("w_push", pre=pre, boost=boost)
    assert p.point.kind.value == "boosted"
    calls = _check_run(run, "push", per_thread)
    assert p.mode == ("boosted" if boost else "stepped")
    assert (p.hits, p.missed) == (calls, 0)
    assert seen == {"pre": calls, "bad": 0}
    assert run.proc.slots.stats()["slots_used"] == 1


@pytest.mark.parametrize("boost", [True, False])
def test_ret_probe_counts_every_call(procs, fixture, boost):
    """`ret` runs as a copy in a slot and leaves it straight for its return address (boosted),
    or is single-stepped there with boost=False, RIP then outside the slot at the return
    address, which the step fix-up must leave alone. The post-handler (stepped) sees RIP at
    the caller's return address, and RSP popped by 8."""
    exe = fixture("eng_work")
    per_thread = ONE_STOP if boost else TWO_STOPS
    run = procs.spawn(exe, "push", THREADS, per_thread)
    seen = {"pre": 0, "post": 0, "bad": 0}
    entry: dict[int, tuple[int, int]] = {}

    def pre(tid, regs):
        seen["pre"] += 1
        if regs.rip != p.address:
            seen["bad"] += 1
        entry[tid] = (regs.rsp, run.proc.tracee.memory.read_u64(regs.rsp))

    def post(tid, regs):
        seen["post"] += 1
        rsp, ret_to = entry.pop(tid)
        if regs.rip != ret_to or regs.rsp != rsp + 8 or run.proc.slots.contains(regs.rip):
            seen["bad"] += 1

    p = run.proc.probe(spec_of(exe, "w_push", "w_push_ret"), pre=pre,
                       post=None if boost else post, boost=boost)
    assert p.point.insn.text == "ret" and p.point.kind.value == "boosted"
    calls = _check_run(run, "push", per_thread)
    assert p.mode == ("boosted" if boost else "stepped")
    assert (p.hits, p.missed) == (calls, 0)
    assert seen == {"pre": calls, "post": 0 if boost else calls, "bad": 0}


def test_stepped_probe_counts_every_call(procs, fixture):
    run = procs.spawn(fixture("eng_work"), "lea", THREADS, TWO_STOPS)
    p = run.proc.probe("w_lea", boost=False)
    calls = _check_run(run, "lea", TWO_STOPS)
    assert p.mode == "stepped"
    assert (p.hits, p.missed) == (calls, 0)


def test_post_handler_keeps_a_boostable_probe_stepped(procs, fixture):
    run = procs.spawn(fixture("eng_work"), "lea", THREADS, TWO_STOPS)
    seen = {"post": 0, "bad": 0}

    def post(tid, regs):
        # After the lea: rax = 3*rdi, RIP on the next instruction of w_lea (original code).
        seen["post"] += 1
        if regs.rax != 3 * regs.rdi or regs.rip != p.address + 4:
            seen["bad"] += 1

    p = run.proc.probe("w_lea", post=post)
    calls = _check_run(run, "lea", TWO_STOPS)
    assert p.mode == "stepped"
    assert (p.hits, p.missed) == (calls, 0)
    assert seen == {"post": calls, "bad": 0}


def test_step_only_instruction_counts_every_call(procs, fixture):
    """`lock add [rip+x], 1` is never boosted: every hit is stepped, and its memory effect
    (a RIP-relative locked add run from the slot) happens exactly once per call."""
    run = procs.spawn(fixture("eng_work"), "lock", THREADS, TWO_STOPS)
    p = run.proc.probe("w_lock")
    calls = _check_run(run, "lock", TWO_STOPS)
    assert p.mode == "stepped"
    assert (p.hits, p.missed) == (calls, 0)
    assert run.results[()]["lock_total"] == calls


def test_aggregate_probes_on_one_address_each_count_every_call(procs, fixture):
    """Three probes on one address share one int3 and one slot; each counts every call, and
    one disabled for the whole run counts none."""
    run = procs.spawn(fixture("eng_work"), "lea,push", 4, 2_000)
    n = {"a": 0}
    a = run.proc.probe("w_lea", pre=lambda tid, regs: n.__setitem__("a", n["a"] + 1))
    b = run.proc.probe("w_lea")
    c = run.proc.probe("w_lea")
    c.disable()
    assert a.point is b.point is c.point
    assert run.finish() == 0, run.text
    calls = run.results[("func", "lea")]["calls"]
    assert calls == 8_000
    assert a.hits == b.hits == n["a"] == calls
    assert c.hits == 0
    assert run.proc.slots.stats()["slots_used"] == 1


@pytest.mark.parametrize("func", ["lea", "push", "call"])
def test_handler_error_counts_as_missed(procs, fixture, func):
    """A raising handler: the hit is counted as missed, never lost, and the program is unharmed."""
    run = procs.spawn(fixture("eng_work"), func, 2, 1_000)

    def pre(tid, regs):
        raise RuntimeError("handler bug")

    p = run.proc.probe("w_" + func, pre=pre)
    assert run.finish() == 0, run.text
    calls = run.results[("func", func)]["calls"]
    assert calls == 2_000
    assert (p.hits, p.missed) == (0, calls)
    assert isinstance(p.last_error, RuntimeError)


@pytest.mark.parametrize("boost", [True, False])
def test_process_exits_while_threads_are_mid_hit(procs, fixture, boost):
    """exit_group while 8 threads hammer a probe: threads die single-stepping a slot or stopped
    at its int3, their exits are reported to the engine after the hits were, and the run ends
    with the program's own exit status; detaching afterwards is a no-op."""
    run = procs.spawn(fixture("eng_work"), "lea,many", 8, -1)
    p = run.proc.probe("w_lea", boost=boost)
    q = run.proc.probe("w_many+0x7", boost=boost)
    assert run.finish() == 0, run.text
    assert run.results[("exiting",)]["sigtrap"] == 0
    assert p.hits > 0 and q.hits > 0 and p.missed == q.missed == 0
    run.proc.detach()
    assert not run.proc.alive and run.proc.exit_code == 0
