"""Frames that share one return address slot: tail calls between probed functions (chained
entries, reported together, innermost first, as kretprobes and uretprobes do), and a thread
caught between a `ret` into the trampoline and its int3 when the tracer detaches."""
from __future__ import annotations

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


def test_detach_with_a_thread_on_the_trampoline_before_its_int3(procs, fixture):
    """A probe on ret_int's `ret` (emulated: RIP = the popped trampoline address) holds the
    thread right there, RIP == trampoline, int3 not executed; detach must send it to its real
    caller before unmapping the trampoline page."""
    exe = fixture("ret_values")
    run = procs.spawn(exe)
    proc = run.proc
    sym = ElfFile.load(exe).lookup("ret_int")[0]
    ret_offset = sym.size - 1
    assert ElfFile.load(exe).read_vaddr(sym.address + ret_offset, 1) == b"\xc3"
    values = []
    rp = proc.return_probe("ret_int", lambda tid, v, ns, x: values.append((x, v.signed)),
                           entry=lambda tid, regs: regs.rdi)
    trampoline = proc.engine.returns.trampoline

    def at_ret(tid, regs):
        if regs.rdi == 25:  # x*x by now: the sixth call (x = 5); hold it once its ret has run
            proc.tracee.hold(tid)
            proc.stop()

    at = proc.probe(f"ret_int+{ret_offset:#x}", pre=at_ret)
    assert at.mode == "emulated"
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
