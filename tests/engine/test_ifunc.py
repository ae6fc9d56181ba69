"""A probe on an IFUNC counts the calls of the implementation the loader selected for it, not the
one call of its resolver; the probe's name says which implementation that is (ISSUE 14, item 6).
Where nothing is resolved yet (the exec stop) the probe stays on the resolver, and says so.

eng_ifunc defines ifunc_pick, an IFUNC whose resolver selects ifunc_second, and calls it and
libc's strlen (an IFUNC too) N times; it prints its own counts.
"""
from __future__ import annotations

import re

import pytest

import pyprobes
from pyprobes.symbols import ElfFile, modules
from pyprobes.symbols.relocs import relocations

N = 60


def _counts(text: str) -> dict[str, int]:
    m = re.search(r"first=(\d+) second=(\d+) resolver=(\d+) strlen=(\d+)", text)
    assert m, text
    return dict(zip(("first", "second", "resolver", "strlen"), map(int, m.groups())))


@pytest.fixture(params=["pie", "nopie"])
def exe(request, fixture):
    return fixture("eng_ifunc") if request.param == "pie" else fixture("eng_ifunc", "-no-pie")


def test_a_probe_on_an_ifunc_counts_the_selected_implementation(procs, exe):
    run = procs.spawn(exe, N)
    proc = run.proc
    proc.run_to_entry()
    own = proc.probe(f"{exe.name}:ifunc_pick")
    strlen = proc.probe("libc:strlen")
    assert own.name == f"{exe.name}:ifunc_pick -> ifunc_second"
    assert own.target.ifunc.name == "ifunc_pick" and own.target.symbol.name == "ifunc_second"
    assert not own.target.is_ifunc_resolver
    assert strlen.name.startswith("libc.so.6:strlen -> ") and strlen.target.symbol.name != "strlen"
    assert run.finish() == 0
    counts = _counts(run.text)
    assert counts["second"] == N and counts["resolver"] == 1
    assert own.hits == counts["second"]
    assert strlen.hits >= N


def test_before_the_loader_ran_the_probe_is_on_the_resolver(procs, exe):
    """At the exec stop nothing is relocated: the probe is the resolver's, and says so."""
    run = procs.spawn(exe, N)
    proc = run.proc
    p = proc.probe("ifunc_pick")
    assert p.target.is_ifunc_resolver and p.target.ifunc is None
    assert p.name == f"{exe.name}:ifunc_pick"
    assert run.finish() == 0
    assert p.hits == _counts(run.text)["resolver"] == 1


def test_attached_late_the_probe_is_on_the_implementation(procs, fixture):
    run = procs.start(fixture("eng_ifunc"), N, 300_000)
    run.wait_output(r"^ready$")
    proc = procs.attach(run)
    p = proc.probe("ifunc_pick")
    r = proc.return_probe("ifunc_pick")
    assert p.name.endswith("ifunc_pick -> ifunc_second")
    assert r.address == p.address  # a return probe follows the IFUNC too
    while proc.alive:
        proc.run()
    assert proc.exit_code == 0
    assert p.hits == _counts(run.output.read_to_eof())["second"] == N


def test_a_glob_gives_one_probe_per_implementation(procs, exe):
    """`libc:strl*` matches strlen and the implementation it resolved to: one probe at that
    address (two would count every call twice), named after the IFUNC."""
    run = procs.spawn(exe, N)
    proc = run.proc
    proc.run_to_entry()
    probes = proc.probe_all("libc:strl*")
    addresses = [p.address for p in probes]
    assert len(addresses) == len(set(addresses))
    (strlen,) = [p for p in probes if p.name.startswith("libc.so.6:strlen")]
    assert strlen.target.ifunc is not None
    assert run.finish() == 0
    assert strlen.hits >= N


def test_relocations_name_each_ifunc_resolver(fixture, tmp_path):
    """The IRELATIVE relocation of ifunc_pick has its resolver as addend; with the section
    headers gone the PT_DYNAMIC entries give the same relocations."""
    exe = fixture("eng_ifunc")
    elf = ElfFile.load(exe)
    (resolver,) = elf.lookup("ifunc_pick")
    assert resolver.kind == "ifunc"
    found = relocations(elf)
    assert len(found.irelative[resolver.address]) == 1
    assert "strlen" in found.bound
    data = bytearray(exe.read_bytes())
    data[0x28:0x30] = bytes(8)   # e_shoff
    data[0x3C:0x40] = bytes(4)   # e_shnum, e_shstrndx
    bare = tmp_path / "bare"
    bare.write_bytes(data)
    assert relocations(ElfFile.load(bare)) == found
