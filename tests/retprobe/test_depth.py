"""The depth limit (kretprobes' maxactive): calls beyond it are not hijacked and count as missed,
and the program's result is unaffected."""
from __future__ import annotations

import re

DEPTH = 200
ROUNDS = 3


def _rounds(text: str) -> list[tuple[int, int]]:
    return [(int(v), int(c)) for v, c in re.findall(r"^round \d+ got (\d+) calls (\d+)$", text, re.M)]


def test_recursion_200_deep_with_the_default_limit(procs, fixture):
    run = procs.spawn(fixture("ret_recurse"), DEPTH, ROUNDS)
    proc = run.proc
    values = []
    rp = proc.return_probe("rec", lambda tid, v, ns, n: values.append((n, int(v))),
                           entry=lambda tid, regs: regs.rdi)
    assert rp.maxactive == 64
    assert proc.run() == 0, run.text
    calls = DEPTH + 1
    assert _rounds(run.text) == [(DEPTH * (DEPTH + 1) // 2, calls)] * ROUNDS
    # The 64 outermost calls of each round are followed; the 137 deeper ones are missed.
    assert (rp.hits, rp.missed, rp.dropped) == (64 * ROUNDS, (calls - 64) * ROUNDS, 0)
    # Each followed call reports its own return: rec(n) = n(n+1)/2, innermost first.
    one_round = [(n, n * (n + 1) // 2) for n in range(DEPTH - 63, DEPTH + 1)]
    assert values == one_round * ROUNDS
    assert not proc.engine.returns.stacks.get(proc.pid)


def test_recursion_with_a_smaller_limit(procs, fixture):
    run = procs.spawn(fixture("ret_recurse"), 50, 2)
    proc = run.proc
    rp = proc.return_probe("rec", None, maxactive=10)
    assert proc.run() == 0, run.text
    assert _rounds(run.text) == [(50 * 51 // 2, 51)] * 2
    assert (rp.hits, rp.missed, rp.dropped) == (10 * 2, 41 * 2, 0)
