"""spawn() stops before the program's first instruction; breakpoints are hit as BREAKPOINT
events; a forked child does not inherit our int3 bytes."""
from __future__ import annotations

import os

from elftools.elf.elffile import ELFFile

from pyprobes.symbols import main_module, read_maps, resolve
from pyprobes.tracee import EventKind

from .conftest import expect_exit

INT3 = 0xCC


def _interpreter(exe) -> str:
    with open(exe, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_INTERP":
                return seg.get_interp_name()
    raise AssertionError(f"{exe} has no PT_INTERP")


def _variable(pid: int, exe, name: str) -> int:
    """Runtime address of global variable NAME of the main binary."""
    with open(exe, "rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]
        value = sym["st_value"]
    return main_module(pid).to_runtime(value)


def _wait_for(tracee, kind):
    """Handle events the default way until one of KIND arrives; return it."""
    while True:
        event = tracee.wait()
        if event.kind is kind:
            return event
        tracee.handle_default(event)


def test_spawn_stops_in_the_loader_and_main_breakpoint_hits(procs, fixture):
    exe = fixture("tr_hello")
    tracee, out = procs.spawn_tracee([exe])
    assert set(tracee.threads) == {tracee.pid}
    # Before the first instruction: RIP is in the dynamic loader, not in the program.
    rip = tracee.get_rip(tracee.pid)
    where = [m for m in read_maps(tracee.pid) if m.start <= rip < m.end]
    assert len(where) == 1 and "x" in where[0].perms
    assert os.path.basename(where[0].path).startswith("ld-linux")
    assert os.path.realpath(where[0].path) == os.path.realpath(_interpreter(exe))
    assert main_module(tracee.pid).mapping_at(rip) is None
    # No user code ran: main's own counter is still zero, nothing was printed.
    entered = _variable(tracee.pid, exe, "main_entered")
    assert tracee.memory.read(entered, 4) == bytes(4)

    [target] = resolve(tracee.pid, "main")
    main = target.address
    assert main_module(tracee.pid).mapping_at(main) is not None
    original = tracee.memory.read(main, 1)
    tracee.breakpoints.insert(main)
    assert tracee.memory.read(main, 1)[0] == INT3
    assert tracee.breakpoints.restore_view(main, tracee.memory.read(main, 4))[:1] == original

    tracee.thaw()
    event = _wait_for(tracee, EventKind.BREAKPOINT)
    assert event.tid == tracee.pid and event.address == main
    assert tracee.get_rip(tracee.pid) == main + 1
    assert tracee.memory.read(entered, 4) == bytes(4)
    out.poll()
    assert out.text == ""

    tracee.breakpoints.remove(main)
    assert tracee.memory.read(main, 1) == original
    tracee.set_rip(tracee.pid, main)
    tracee.resume(tracee.pid)
    assert expect_exit(tracee) == 5
    assert out.read_to_eof() == "hello 42 entered 1\n"


def test_forked_children_do_not_inherit_breakpoints(procs, fixture):
    nchildren = 3
    tracee, out = procs.spawn_tracee([fixture("tr_fork"), nchildren])
    [target] = resolve(tracee.pid, "child_work")
    address = target.address
    tracee.breakpoints.insert(address)
    tracee.thaw()
    forks = []
    while True:
        event = tracee.wait()
        if event.kind is EventKind.FORK:
            forks.append(event.child)
        if event.kind is EventKind.BREAKPOINT:
            break
        tracee.handle_default(event)
    # Only the parent stops there, after every child ran child_work() untraced and exited 0.
    assert event.tid == tracee.pid and event.address == address
    assert len(forks) == nchildren
    assert tracee.memory.read(address, 1)[0] == INT3
    out.poll()
    for i in range(nchildren):
        assert f"child {i} r {2 * (20 + i) + 1}\n" in out.text
        assert f"child {i} status 0\n" in out.text
    assert "parent" not in out.text

    tracee.set_rip(event.tid, address)
    tracee.breakpoints.remove(address)
    tracee.resume(event.tid)
    assert expect_exit(tracee) == 0
    text = out.read_to_eof()
    assert text.endswith("parent r 3\n"), text
    assert text.count("status 0") == nchildren
