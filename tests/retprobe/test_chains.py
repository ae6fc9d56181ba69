"""Frames that share one return address slot: tail calls between probed functions (chained
entries, reported together, innermost first, as kretprobes and uretprobes do), a probe on the
`ret` of a return-probed function (the copy in a slot returns into the trampoline), and a
thread caught between a `ret` into the trampoline and its int3 when the tracer detaches."""
from __future__ import annotations

import pytest

from pyprobes.symbols import ElfFile

from .conftest import maps, text_differences

ROUNDS = 20


def test_tail_calls_between_probed_functions(procs, fixture):
    run = procs.spawn(fixture("ret_tail"), ROUNDS)
    proc = run.proc
    seen = []
    rps = {name: proc.return_probe(name, lambda tid, v, ns, d: seen.append((d[0], d[1], int(v), ns)),
                                   entry=lambda tid, regs, n=name: (n, regs.rdi))
           for name in ("top", "mid", "leaf")}
    assert proc.run() == 0, run.text
    assert run.text.splitlines() == [f"round {r} top {2 * (r * 10 + 2)}" for r in range(ROUNDS)] + ["done"]
    for rp in rps.values():
        assert (rp.hits, rp.missed, rp.dropped) == (ROUNDS, 0, 0), rp
    want = []
    for r in range(ROUNDS):
        x = r * 10
        v = 2 * (x + 2)
        want += [("leaf", x + 2, v), ("mid", x + 1, v), ("top", x, v)]
    assert [s[:3] for s in seen] == want
    # the outer frames started earlier: their elapsed times are at least the inner ones'
    for i in range(0, len(seen), 3):
        assert seen[i][3] <= seen[i + 1][3] <= seen[i + 2][3]
    assert not proc.engine.returns.stacks.get(run.pid)


def test_tail_calls_over_the_depth_limit(procs, fixture):
    """With room for one entry, the chained calls are missed, and top still returns right."""
    run = procs.spawn(fixture("ret_tail"), ROUNDS)
    proc = run.proc
    rps = [proc.return_probe(name, None, maxactive=1) for name in ("top", "mid", "leaf")]
    assert proc.run() == 0, run.text
    assert run.text.splitlines()[-2:] == [f"round {ROUNDS - 1} top {2 * ((ROUNDS - 1) * 10 + 2)}", "done"]
    assert [(rp.hits, rp.missed, rp.dropped) for rp in rps] == [(ROUNDS, 0, 0), (0, ROUNDS, 0), (0, ROUNDS, 0)]


def _ret_offset(exe) -> int:
    sym = ElfFile.load(exe).lookup("ret_int")[0]
    ret_offset = sym.size - 1
    assert ElfFile.load(exe).read_vaddr(sym.address + ret_offset, 1) == b"\xc3"
    return ret_offset


@pytest.mark.parametrize("boost", [True, False])
def test_probe_on_the_ret_of_a_return_probed_function(procs, fixture, boost):
    """ret_int's `ret` probed while a return probe hijacks ret_int's return address: the `ret`
    runs as a copy in a slot (boosted; or single-stepped with boost=False) and pops the
    trampoline's address, leaving the slot for the trampoline; every return value is still
    reported exactly once, and the program sees its own return values."""
    exe = fixture("ret_values")
    run = procs.spawn(exe)
    proc = run.proc
    values = []
    rp = proc.return_probe("ret_int", lambda tid, v, ns, x: values.append((x, v.signed)),
                           entry=lambda tid, regs: regs.rdi)
    trampoline = proc.engine.returns.trampoline
    seen = {"pre": 0, "post": 0, "bad": []}
    before: dict[int, int] = {}

    def pre(tid, regs):
        seen["pre"] += 1
        before[tid] = regs.rsp
        popped = proc.tracee.memory.read_u64(regs.rsp)
        # ret_int squared x in rdi: rax = rdi - 1000 by now
        if popped != trampoline or regs.rax != (regs.rdi - 1000) & 0xFFFF_FFFF_FFFF_FFFF:
            seen["bad"].append(("pre", hex(popped), regs.rdi, regs.rax))

    def post(tid, regs):
        # Stepped: RIP is the popped return address (the trampoline, outside any slot), left
        # alone by the step fix-up; RSP popped by 8.
        seen["post"] += 1
        if regs.rip != trampoline or regs.rsp != before.pop(tid) + 8:
            seen["bad"].append(("post", hex(regs.rip), hex(regs.rsp)))

    at = proc.probe(f"ret_int+{_ret_offset(exe):#x}", pre=pre, post=None if boost else post,
                    boost=boost)
    assert at.point.insn.text == "ret"
    assert proc.run() == 0, run.text
    assert run.text.endswith("done\n")
    assert at.mode == ("boosted" if boost else "stepped")
    assert (at.hits, at.missed) == (40, 0)
    assert seen == {"pre": 40, "post": 0 if boost else 40, "bad": []}
    assert (rp.hits, rp.missed, rp.dropped) == (40, 0, 0)
    assert values == [(x, x * x - 1000) for x in range(40)]
    assert all(f"int x {x} got {x * x - 1000}\n" in run.text for x in range(40))


def test_detach_with_a_thread_on_the_trampoline_before_its_int3(procs, fixture):
    """A probe on ret_int's `ret` with a post-handler (so stepped: after the step RIP = the
    popped trampoline address, outside the slot) holds the thread right there, RIP ==
    trampoline, int3 not executed; detach must send it to its real caller before unmapping
    the trampoline page."""
    exe = fixture("ret_values")
    run = procs.spawn(exe)
    proc = run.proc
    ret_offset = _ret_offset(exe)
    values = []
    rp = proc.return_probe("ret_int", lambda tid, v, ns, x: values.append((x, v.signed)),
                           entry=lambda tid, regs: regs.rdi)
    trampoline = proc.engine.returns.trampoline

    def at_ret(tid, regs):
        if regs.rdi == 25:  # x*x by now: the sixth call (x = 5); hold it once its ret has run
            proc.tracee.hold(tid)
            proc.stop()

    at = proc.probe(f"ret_int+{ret_offset:#x}", post=at_ret)
    assert at.mode == "stepped"
    assert proc.run() is None
    assert proc.tracee.get_rip(run.pid) == trampoline  # returned into the trampoline, not trapped yet
    assert len(values) == 5
    proc.detach()
    assert values[-1] == (5, 25 - 1000)  # its return is reported at the detach
    assert (rp.hits, rp.missed) == (6, 0)
    assert not any(start <= trampoline < end for start, end, _, _ in maps(run.pid))
    assert text_differences(run.pid, exe) == []
    assert run.wait_exit() == 0, run.text
    assert "int x 5 got -975\n" in run.text and run.text.endswith("done\n")
