"""Process.busy_wait_us: after a resume, run() polls for the next stop before it sleeps.

Polling must change nothing but speed: counts stay exact with it off, at the default and with a
budget far longer than any gap; there is no polling while the process has as many threads as the
tracer has CPUs; run(timeout)
and stop() still end a run while polling; the CLI takes --busy-wait and refuses a negative one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pyprobes
from pyprobes.tracee import DEFAULT_BUSY_WAIT_NS

WORKLOADS = {  # threads (the main one among them), calls per thread, µs between calls
    "dense": (1, 3_000, 0),
    "dense, 2 threads": (2, 3_000, 0),
    "sparse": (1, 150, 300),
}
CPUS = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("busy_wait_us", [0, DEFAULT_BUSY_WAIT_NS / 1000, 100_000])
def test_counts_exact_at_every_budget(procs, fixture, workload, busy_wait_us):
    threads, n, gap = WORKLOADS[workload]
    run = procs.spawn(fixture("eng_paced"), threads, n, gap)
    run.proc.busy_wait_us = busy_wait_us
    assert run.proc.busy_wait_us == busy_wait_us
    p = run.proc.probe("paced_hit")
    assert run.finish() == 0, run.text
    assert run.text.split() == ["calls", str(threads * n)]
    assert (p.hits, p.missed) == (threads * n, 0)
    stats = run.proc.tracee.poll_stats
    caught, missed, skipped = stats["caught"], stats["timed_out"], stats["skipped"]
    if busy_wait_us == 0:
        assert (caught, missed, skipped) == (0, 0, 0)
    elif threads < CPUS and workload != "sparse" and busy_wait_us >= 100_000:
        # A budget far longer than any gap of a dense workload: the polls are used and catch stops.
        assert caught > 0, run.proc.tracee.poll_stats
    # How many polls catch a stop at the default budget, the back-off when they time out
    # (sparse: 1, 3, 7 ... 63 waits without a poll after each miss), and how few polls a process
    # with as many threads as CPUs gets (only while it runs on one thread: how long that lasts is
    # the scheduler's), depend on the machine's speed: python -m bench.busy_wait shows them next
    # to the budget-0 reference.


def test_timeout_and_stop_end_a_polling_run(procs, fixture):
    """A one-second budget, and a process that goes quiet for 3 s: run(timeout) returns on time
    (the watchdog fails the test if not), and so does run() after stop() from a handler."""
    run = procs.spawn(fixture("eng_paced"), 1, 200, 0, 3000)
    proc = run.proc
    proc.busy_wait_us = 1_000_000
    p = proc.probe("paced_hit", pre=lambda tid, regs: proc.stop() if p.hits == 49 else None)
    assert proc.run() is None  # stop() at the 50th hit
    assert p.hits == 50
    while p.hits < 200:
        assert proc.run(timeout=0.5) is None or not proc.alive
    assert proc.alive  # now in its 3 s pause: nothing stops, the timer must end the run
    assert proc.run(timeout=0.2) is None
    proc.busy_wait_us = 0
    assert run.finish() == 0
    assert run.text.split() == ["calls", "200"]


def test_share_cpu_stops_polling(procs, fixture):
    """Tracer and thread on one CPU: a poll would hold the CPU the thread needs to reach its stop."""
    run = procs.spawn(fixture("eng_paced"), 1, 2_000, 0)
    before = os.sched_getaffinity(0)
    try:
        assert run.proc.busy_wait_us == DEFAULT_BUSY_WAIT_NS / 1000
        run.proc.share_cpu()
        assert run.proc.busy_wait_us == 0
        p = run.proc.probe("paced_hit")
        assert run.finish() == 0
        assert p.hits == 2_000 and not any(run.proc.tracee.poll_stats.values())
    finally:
        os.sched_setaffinity(0, before)


def test_negative_budget_is_refused(procs, fixture):
    run = procs.spawn(fixture("eng_paced"), 1, 1, 0)
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            run.proc.busy_wait_us = bad


def test_cli_busy_wait_option(fixture):
    exe = str(fixture("eng_paced"))
    ok = subprocess.run([sys.executable, "-m", "pyprobes", "count", "--busy-wait", "0", "--json", "paced_hit",
                         "--", exe, "2", "500", "0"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "calls 1000" in ok.stdout
    report = json.loads(ok.stderr.strip().splitlines()[-1])
    assert [(r["probe"].split(":")[-1], r["hits"], r["missed"]) for r in report["probes"]] == [("paced_hit", 1000, 0)]
    for value in ("-1", "inf", "nan"):
        bad = subprocess.run([sys.executable, "-m", "pyprobes", "count", "--busy-wait", value, "paced_hit",
                              "--", exe, "1", "1", "0"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2
        assert bad.stderr.strip().splitlines() == ["pyprobes: --busy-wait must be 0 or more microseconds"]
