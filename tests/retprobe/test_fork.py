"""fork() while the parent is inside probed functions: the child starts with a copy of the stack,
hijacked return addresses included; they are rewritten in the child before it runs untraced, so
it returns through both frames to its real callers."""
from __future__ import annotations

import re

ROUNDS = 4


def test_child_returns_through_hijacked_frames_untraced(procs, fixture):
    run = procs.spawn(fixture("ret_fork"), ROUNDS)
    proc = run.proc
    seen = []
    rps = {name: proc.return_probe(name, lambda tid, v, ns, d: seen.append((d, tid, int(v))),
                                   entry=lambda tid, regs, n=name: n)
           for name in ("outer", "forker")}
    assert proc.run() == 0, run.text
    lines = run.text.splitlines()
    assert lines[-1] == "done"
    for r in range(ROUNDS):
        # the child got its own value back through both frames and exited 0
        assert f"child {r} outer {r * 10 + 101}" in lines, run.text
        # as its parent saw it: a normal exit with status 0 (not SIGTRAP/SIGSEGV from a trampoline)
        assert f"parent {r} outer {r * 10 + 102} child-status 0" in lines, run.text
    assert len([x for x in lines if x.startswith("child ")]) == ROUNDS
    # Only the parent's returns are reported (the children are not traced).
    assert seen == [item for r in range(ROUNDS)
                    for item in (("forker", run.pid, r * 10 + 2), ("outer", run.pid, r * 10 + 102))]
    assert [(rp.hits, rp.missed, rp.dropped) for rp in rps.values()] == [(ROUNDS, 0, 0)] * 2
    assert re.search(r"^parent 0 ", run.text, re.M)
