"""A pre-handler that changes its own probe from inside the hit: removes it, disables it (and a
later hit elsewhere enables it again), or redirects execution (skips the probed function by
returning from it with a value of its own). The hit path must then run the original instruction
in place (the probe is gone or disarmed) or nothing at all (RIP moved), for a boosted and for a
stepped probe alike, and leave the text as the file has it.

eng_counted counts its own calls and sums what they returned, so every count is exact.
"""
from __future__ import annotations

import struct

import pytest

from .conftest import read_mem
from processes import text_differences

N = 40
SUM = sum(3 * i for i in range(N))
MODES = {"boosted": True, "stepped": False}


def _start(procs, fixture):
    run = procs.spawn(fixture("eng_counted"), N, stdin_pipe=True)
    return run, run.proc


def _end(run, calls: int, total: int) -> None:
    """The program's own summary, the text after detach, and a clean exit."""
    m = run.run_until(r"^counted calls (\d+) sum (-?\d+)$")
    assert (int(m[1]), int(m[2])) == (calls, total), run.text
    run.proc.detach()
    assert text_differences(run.pid, run.exe) == []
    run.close_stdin()
    assert run.wait_exit() == 0, run.text


@pytest.mark.parametrize("mode", list(MODES))
def test_pre_handler_removes_its_own_probe(procs, fixture, mode):
    run, proc = _start(procs, fixture)
    seen = []

    def pre(tid, regs):
        seen.append(regs.rdi)
        if len(seen) == 5:
            p.remove()

    p = proc.probe("counted", pre=pre, boost=MODES[mode])
    _end(run, N, SUM)
    assert p.mode == mode
    assert seen == [0, 1, 2, 3, 4]
    assert (p.hits, p.missed) == (5, 0)
    assert proc.probes == []


@pytest.mark.parametrize("mode", list(MODES))
def test_pre_handler_disables_its_own_probe_and_a_later_hit_enables_it(procs, fixture, mode):
    run, proc = _start(procs, fixture)
    seen = []

    def pre(tid, regs):
        seen.append(regs.rdi)
        if len(seen) == 5:
            p.disable()

    p = proc.probe("counted", pre=pre, boost=MODES[mode])
    h = proc.probe("halfway", pre=lambda tid, regs: p.enable())
    _end(run, N, SUM)
    assert p.mode == mode
    assert seen == [0, 1, 2, 3, 4] + list(range(N // 2, N))
    assert (p.hits, p.missed) == (5 + N - N // 2, 0)
    assert h.hits == 1


@pytest.mark.parametrize("mode", list(MODES))
def test_pre_handler_redirects_its_own_hit(procs, fixture, mode):
    """At the 5th call, return from counted() at once with 1000: the function does not run
    (its own count misses that call), the program sees 1000, and every other call is intact."""
    run, proc = _start(procs, fixture)
    seen = []

    def pre(tid, regs):
        seen.append(regs.rdi)
        if regs.rdi == 4:
            (regs.rip,) = struct.unpack("<Q", read_mem(proc.pid, regs.rsp, 8))
            regs.rsp += 8
            regs.rax = 1000

    p = proc.probe("counted", pre=pre, boost=MODES[mode])
    _end(run, N - 1, SUM - 3 * 4 + 1000)
    assert p.mode == mode
    assert seen == list(range(N))
    assert (p.hits, p.missed) == (N, 0)
