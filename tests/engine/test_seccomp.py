"""Seccomp (issue 14, item 2): a process that seccomp would kill, or fail, for the mmap of a
slot page is never sent one. In strict mode and under filters that kill, trap or fail mmap, a
probe that needs a slot is refused with one clear line, an emulated probe still counts, and
after detach the process runs on with its text as the file has it. A filter that lets mmap
through changes nothing. (tests/fixtures/sec_modes.c; the interpreter: tests/tracee/test_seccomp_filter.py)
"""
from __future__ import annotations

import re

import pytest

import pyprobes

from .conftest import function_bytes, load_bias, read_mem

REFUSING = {
    "strict": "runs in seccomp strict mode",
    "kill-mmap": "seccomp filter answers mmap with kill-process",
    "trap-mmap": "seccomp filter answers mmap with trap (SIGSYS)",
    "eperm-mmap": "seccomp filter answers mmap with errno 1 (EPERM)",
    "kill-exec": "seccomp filter answers mmap with kill-process",
}
SLOTS_LINE = "pyprobes cannot map instruction slots in it; only emulated probes can be placed"


SHIFT = 10
PERIOD = 1 << SHIFT  # rounds between two "alive" lines


def _start(procs, fixture, mode: str):
    run = procs.start(fixture("sec_modes"), mode, SHIFT)
    run.wait_output(r"^ready$")
    return run


def _alive_count(run) -> int:
    found = re.findall(r"^alive (\d+)$", run.text, re.M)
    return int(found[-1]) if found else 0


def _run_until(proc, condition) -> None:
    while not condition():
        assert proc.alive, proc.exit_code
        proc.run(timeout=0.02)


def _assert_runs_on_untouched(run) -> None:
    """Detached: its code is the file's, and it keeps calling (new "alive" lines)."""
    for name in ("emulated_entry", "slot_entry"):
        link, want = function_bytes(run.exe, name)
        assert read_mem(run.pid, load_bias(run.pid, run.exe) + link, len(want)) == want, name
    seen = _alive_count(run)
    run.wait_output(rf"^alive {seen + PERIOD}$")
    assert not run._exited()


@pytest.mark.parametrize("mode", sorted(REFUSING))
def test_a_slot_is_refused_and_the_process_lives(procs, fixture, mode):
    run = _start(procs, fixture, mode)
    proc = procs.attach(run)
    emulated = proc.probe("emulated_entry")
    assert emulated.mode == "emulated"
    with pytest.raises(pyprobes.ProbeError) as refused:
        proc.probe("slot_entry")
    assert str(refused.value) == f"PID {run.pid}{'' if mode == 'strict' else chr(39) + 's'} {REFUSING[mode]}: {SLOTS_LINE}"
    with pytest.raises(pyprobes.ProbeError):
        proc.return_probe("slot_entry")  # its trampoline page is a mapping too
    _run_until(proc, lambda: emulated.hits > 1000)
    assert proc.alive
    proc.detach()
    _assert_runs_on_untouched(run)


def test_a_filter_that_allows_mmap_changes_nothing(procs, fixture):
    """It kills on getppid: the injected mmap passes, and both probes count every call."""
    run = _start(procs, fixture, "kill-getppid")
    proc = procs.attach(run)
    emulated = proc.probe("emulated_entry")
    slotted = proc.probe("slot_entry")
    assert slotted.mode in ("boosted", "stepped")
    _run_until(proc, lambda: slotted.hits > 1000)
    assert slotted.hits > 1000 and abs(slotted.hits - emulated.hits) <= 1
    proc.detach()
    _assert_runs_on_untouched(run)
