"""Attaching to a process that is not simply running (issue 14, item 8).

A SIGSTOP'd process: probes are placed (a slot page's mmap is injected into a thread taken out
of its job-control stop and put back), run(timeout) returns although no thread can report, the
process is stopped as before after detach, and a SIGCONT, while attached or after, lets it run
and count. A zombie: one line naming its parent. (tests/fixtures/sec_modes.c, mode "none")
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import pyprobes

from .conftest import function_bytes, load_bias, read_mem

SHIFT = 10


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, states: str, seconds: float = 20.0) -> str:
    deadline = time.monotonic() + seconds
    while (state := _state(pid)) not in states:
        assert time.monotonic() < deadline, f"PID {pid} is {state!r}, not one of {states!r}"
        time.sleep(0.001)
    return state


def _stopped(procs, fixture):
    run = procs.start(fixture("sec_modes"), "none", SHIFT)
    run.wait_output(r"^ready$")
    os.kill(run.pid, signal.SIGSTOP)
    _wait_state(run.pid, "T")
    return run


def _text_intact(run) -> None:
    for name in ("emulated_entry", "slot_entry"):
        link, want = function_bytes(run.exe, name)
        assert read_mem(run.pid, load_bias(run.pid, run.exe) + link, len(want)) == want, name


def _runs_on(run) -> None:
    seen = re.findall(r"^alive (\d+)$", run.text, re.M)
    run.wait_output(rf"^alive {(int(seen[-1]) if seen else 0) + (1 << SHIFT)}$")


def test_a_stopped_process_stays_stopped(procs, fixture):
    run = _stopped(procs, fixture)
    proc = procs.attach(run)
    slotted = proc.probe("slot_entry")  # its slot page: an mmap injected into a stopped thread
    emulated = proc.probe("emulated_entry")
    assert slotted.point.slot is not None
    assert proc.run(timeout=0.05) is None  # returns, though no thread can stop for it
    assert slotted.hits == emulated.hits == 0
    proc.detach()
    _wait_state(run.pid, "T")
    _text_intact(run)
    os.kill(run.pid, signal.SIGCONT)
    _runs_on(run)


def test_placed_while_paused_then_detached(procs, fixture):
    """The thread the mmap ran on is still in its trap stop at detach: it goes back to stopped."""
    run = _stopped(procs, fixture)
    proc = procs.attach(run)
    proc.pause()
    proc.probe("slot_entry")
    proc.detach()
    _wait_state(run.pid, "T")
    _text_intact(run)
    os.kill(run.pid, signal.SIGCONT)
    _runs_on(run)


def test_continued_while_attached(procs, fixture):
    run = _stopped(procs, fixture)
    proc = procs.attach(run)
    slotted = proc.probe("slot_entry")
    proc.run(timeout=0.02)
    os.kill(run.pid, signal.SIGCONT)
    while slotted.hits < 1000:
        assert proc.run(timeout=0.02) is None
    os.kill(run.pid, signal.SIGSTOP)
    proc.run(timeout=0.02)
    proc.detach()
    _wait_state(run.pid, "T")
    _text_intact(run)
    os.kill(run.pid, signal.SIGCONT)
    _runs_on(run)


def test_a_zombie_is_named_as_one(procs):
    run = procs.start("true", stdin_pipe=False)
    _wait_state(run.pid, "Z")
    message = f"process {run.pid} has exited (a zombie, not yet reaped by its parent PID {os.getpid()})"
    with pytest.raises(pyprobes.PyprobesError) as refused:
        pyprobes.attach(run.pid)
    assert str(refused.value) == message
    r = subprocess.run([sys.executable, "-m", "pyprobes", "count", "-p", str(run.pid), "main"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (1, f"pyprobes: {message}\n")
