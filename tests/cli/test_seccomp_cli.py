"""`pyprobes count -p PID` on a process in seccomp strict mode (issue 14, item 2): a probe
that needs an instruction slot ends the command with one line and status 2, and the process
runs on; an emulated probe is counted. (tests/fixtures/sec_modes.c)"""
from __future__ import annotations

import re
import subprocess
import sys

CLI = [sys.executable, "-m", "pyprobes"]


def _count(pid: int, *probes: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "count", "-d", "0.2", "-p", str(pid), *probes], capture_output=True,
                          text=True, timeout=60)


def test_nothing_placeable_is_one_line_and_a_failure(procs, fixture):
    run = procs.start(fixture("sec_modes"), "strict", 30)
    run.wait_output(r"^ready$")
    r = _count(run.pid, "slot_entry")
    assert r.returncode == 2, r
    assert r.stderr.splitlines()[-1] == (f"pyprobes: PID {run.pid} runs in seccomp strict mode: pyprobes cannot "
                                         "map instruction slots in it; only emulated probes can be placed")
    assert "Traceback" not in r.stderr
    assert not run._exited()


def test_an_emulated_probe_counts_in_strict_mode(procs, fixture):
    run = procs.start(fixture("sec_modes"), "strict", 30)
    run.wait_output(r"^ready$")
    r = _count(run.pid, "emulated_entry")
    assert r.returncode == 0, r
    hits = re.search(r"emulated_entry\s.*emulated\D+(\d+)", r.stdout + r.stderr)
    assert hits and int(hits[1]) > 0, r
    assert not run._exited()
