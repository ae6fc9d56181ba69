"""Leaving (invariant 3): after detach -- explicit, at the end of a `with` block, on an error
inside it, or from a process pyprobes attached to -- while 8 threads run through boosted,
emulated and stepped probes (and garbage slots wait for collection), the tracee's text is
byte-identical to the file, no slot page is left in its maps, and the program runs on to
correct results untraced.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

import pyprobes
from pyprobes.symbols import ElfFile
from pyprobes.symbols.elf import PF_X

from .conftest import load_bias, maps, parse_output, read_mem

# boosted (w_lea, w_push, w_many...), stepped (w_lock), emulated (w_call: writes the stack)
PROBED = ["w_lea", "w_push", "w_lock", "w_many", "w_many+0x3", "w_many+0x7", "w_call"]


def _text_diff(pid: int, exe) -> list[str]:
    """Where the process's executable segments of EXE differ from the file's bytes."""
    elf = ElfFile.load(exe)
    bias = load_bias(pid, exe)
    diffs = []
    for seg in elf.segments:
        if not seg.flags & PF_X:
            continue
        want = elf.read_vaddr(seg.vaddr, seg.filesz)
        got = read_mem(pid, bias + seg.vaddr, seg.filesz)
        if got != want:
            where = [hex(seg.vaddr + i) for i in range(len(want)) if got[i] != want[i]]
            diffs.append(f"segment {seg.vaddr:#x}: {len(where)} bytes differ at {where[:8]}")
    return diffs


def _exec_mappings(pid: int) -> set[tuple[int, int]]:
    return {(start, end) for start, end, perms, _ in maps(pid) if "x" in perms}


def _probe_and_churn(proc: pyprobes.Process) -> set[int]:
    """Probes of each kind, run under load, a few removed (garbage left uncollected);
    returns the slot pages used."""
    probes = [proc.probe(spec) for spec in PROBED]
    probes.append(proc.probe("w_many+0xb", boost=False))
    deadline = time.monotonic() + 10
    while not all(p.hits > 3 for p in probes) and time.monotonic() < deadline:
        proc.run(timeout=0.05)
    assert all(p.hits > 3 for p in probes), [(p.name, p.hits) for p in probes]
    assert {p.mode for p in probes} == {"boosted", "emulated", "stepped"}
    pages = {p.point.slot.page for p in probes if p.point.slot is not None}
    for p in probes[3:6]:  # boosted and dirty: their slots become garbage
        p.remove()
    proc.run(timeout=0.05)
    assert proc.slots.stats()["garbage"] >= 1
    assert pages
    return pages


def _finish_untraced(pid: int, run_text) -> None:
    os.kill(pid, signal.SIGUSR1)
    _, status = os.waitpid(pid, 0)
    text = run_text()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, text)
    res = parse_output(text)
    for func in ("lea", "push", "lock", "many", "call"):
        assert res[("func", func)]["bad"] == 0, text
    assert res[()]["sigtrap"] == 0


def _check_clean(pid, exe, before, pages) -> None:
    assert _text_diff(pid, exe) == []
    after = _exec_mappings(pid)
    assert after <= before, f"new executable mappings after detach: {after - before}"
    for start, end, _, _ in maps(pid):
        assert not any(start <= page < end for page in pages)


@pytest.mark.parametrize("how", ["detach()", "with-block", "error-in-with-block"])
def test_detach_leaves_text_identical_and_no_slot_pages(procs, fixture, how):
    exe = fixture("eng_work")
    run = procs.spawn(exe, "lea,push,lock,many,call", 8, 0)
    proc, pid = run.proc, run.proc.pid
    run.run_until(r"^ready")
    before = _exec_mappings(pid)
    if how == "detach()":
        pages = _probe_and_churn(proc)
        proc.detach()
    elif how == "with-block":
        with proc:
            pages = _probe_and_churn(proc)
    else:
        with pytest.raises(ZeroDivisionError):
            with proc:
                pages = _probe_and_churn(proc)
                1 / 0
    assert not proc.tracee.attached
    _check_clean(pid, exe, before, pages)
    _finish_untraced(pid, lambda: run.text)


def test_detach_from_an_attached_process(procs, fixture):
    exe = fixture("eng_work")
    child = procs.start(exe, "lea,push,lock,many,call", 8, 0)
    child.wait_output(r"^ready")
    before = _exec_mappings(child.pid)
    proc = procs.attach(child)
    try:
        pages = _probe_and_churn(proc)
    finally:
        proc.detach()
    _check_clean(child.pid, exe, before, pages)
    _finish_untraced(child.pid, lambda: child.text)


def test_text_is_restored_between_runs_too(procs, fixture):
    """Probes removed while the process runs on traced: once the last probe is gone, the text
    is the file's again, with no detach needed."""
    exe = fixture("eng_work")
    run = procs.spawn(exe, "lea,push,lock,many,call", 4, 0)
    run.run_until(r"^ready")
    probes = [run.proc.probe(spec) for spec in PROBED]
    run.proc.run(timeout=0.2)
    assert _text_diff(run.proc.pid, exe) != []  # the int3 bytes are there
    for p in probes:
        p.remove()
    assert _text_diff(run.proc.pid, exe) == []
    os.kill(run.proc.pid, signal.SIGUSR1)
    assert run.finish() == 0, run.text


def test_detach_during_a_signal_storm(procs, fixture):
    """Detach while 10 kHz timers keep signalling threads that run through boosted and
    stepped slots: signals held for threads in slots are delivered, none is lost as a stray
    SIGTRAP, and the text is clean."""
    exe = fixture("eng_work")
    run = procs.spawn(exe, "lea,many", 8, 0, "storm", 10_000)
    proc, pid = run.proc, run.proc.pid
    run.run_until(r"^ready")
    before = _exec_mappings(pid)
    a = proc.probe("w_lea")
    b = proc.probe("w_many+0x3", boost=False)
    c = proc.probe("w_many+0x7")
    deadline = time.monotonic() + 10
    while proc.engine.stats["signals_held"] < 20 and time.monotonic() < deadline:
        proc.run(timeout=0.05)
    assert proc.engine.stats["signals_held"] >= 20
    pages = {p.point.slot.page for p in (a, b, c)}
    proc.detach()
    _check_clean(pid, exe, before, pages)
    os.kill(pid, signal.SIGUSR1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, run.text)
    res = run.results
    assert res[("func", "lea")]["bad"] == 0 and res[("func", "many")]["bad"] == 0
    assert res[("signals",)]["hbad"] == 0 and res[()]["sigtrap"] == 0
    assert res[("signals",)]["outside"] == 0
