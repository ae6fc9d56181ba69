"""Jump-optimised probes on a switch-dispatching function (opt_switch.c at -O2, -fPIE and
-fno-pic): its table read from the process, the probe optimised, exact counts from 8 threads,
every result right (the region rules on the table's targets: tests/x86/test_x86_jumptable.py)."""
from __future__ import annotations

import pytest

CALLS, THREADS = 100_000, 8


@pytest.mark.parametrize("flags", [("-O2",), ("-O2", "-fno-pic", "-no-pie")], ids=["pie", "no-pic"])
def test_switch_function_optimised_with_exact_counts(procs, fixture, flags):
    run = procs.spawn(fixture("opt_switch", *flags), CALLS, THREADS)
    proc = run.proc
    probe = proc.probe("opt_switch", action="count")
    assert run.finish() == 0, run.text
    calls = run.results[("calls",)]
    assert calls["bad"] == 0 and run.results[()]["sigtrap"] == 0, run.text
    assert calls["switch"] == CALLS * THREADS
    assert (probe.mode, probe.not_optimized) == ("optimized", "")
    assert (probe.hits, probe.missed) == (calls["switch"], 0)
