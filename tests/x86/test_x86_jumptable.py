"""jumptable: gcc's switch dispatches recognised in real -O2 output (-fPIC and -fno-pic), their
targets equal to the case labels (opt_switch.c marks each case with a global label sw_caseK),
and the region rules applied to those targets."""
from __future__ import annotations

import subprocess

import pytest

from pyprobes.symbols import CodeReader, ElfFile
from pyprobes.x86 import Refusal, RefusalKind, Region, find_region
from pyprobes.x86.jumptable import reached_addresses, switches
from pyprobes.x86.optimize import _scan

VARIANTS = {"pic": ("-O2", "-fPIC"), "no-pic": ("-O2", "-fno-pic", "-no-pie")}


@pytest.fixture(params=sorted(VARIANTS))
def switch_elf(request, fixture):
    elf = ElfFile.load(fixture("opt_switch", *VARIANTS[request.param]))
    (sym,) = [s for s in elf.functions if s.name == "opt_switch"]
    return elf, sym, None


def case_labels(elf) -> list[int]:
    """sw_case0..7 from the symbol table (nm)."""
    out = subprocess.run(["nm", str(elf.path)], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2].startswith("sw_case"):
            found[int(fields[2][7:])] = int(fields[0], 16)
    return [found[k] for k in sorted(found)]


def test_switch_targets_are_the_case_labels(switch_elf):
    elf, sym, _ = switch_elf
    reader = CodeReader(elf)
    code = reader.read(sym.address, sym.size)
    scan = _scan(code, sym.address)
    assert len(scan.jumps) == 1
    found = switches(code, sym.address, scan.boundaries, scan.jumps, [t for _, t in scan.branches], reader.read)
    assert isinstance(found, list) and len(found) == 1, found
    assert list(found[0].targets) == case_labels(elf)  # the bound is 7: eight cases, in order
    # the module sweep sees them too
    sweep = set(reached_addresses(code, sym.address, reader.read))
    assert set(case_labels(elf)) <= sweep


def test_entry_region_allowed_with_the_table_refused_without(switch_elf):
    elf, sym, _ = switch_elf
    reader = CodeReader(elf)
    code = reader.read(sym.address, sym.size)
    region = find_region(code, sym.address, sym.size, sym.address, reader.read)
    assert isinstance(region, Region), region
    without = find_region(code, sym.address, sym.size, sym.address)
    assert isinstance(without, Refusal) and without.kind is RefusalKind.INDIRECT_JUMP
    unreadable = find_region(code, sym.address, sym.size, sym.address, lambda a, n: b"")
    assert isinstance(unreadable, Refusal) and unreadable.kind is RefusalKind.INDIRECT_JUMP


def test_a_region_a_case_lands_in_is_refused(switch_elf):
    """Every instruction boundary of opt_switch as a probe: a region never holds a case label
    past its first byte, and some are refused for holding one."""
    elf, sym, _ = switch_elf
    reader = CodeReader(elf)
    code = reader.read(sym.address, sym.size)
    targets = case_labels(elf)
    by_table = 0
    for boundary in _scan(code, sym.address).boundaries:
        region = find_region(code, sym.address, sym.size, boundary, reader.read)
        if isinstance(region, Region):
            assert not any(region.start < t < region.end for t in targets), (hex(boundary), region)
        elif region.kind is RefusalKind.BRANCH_INTO and "switch table" in region.reason:
            by_table += 1
    assert by_table > 0


@pytest.mark.parametrize("hexcode", [
    "ffe0",              # jmp rax: a tail call through a pointer
    "83f807 7700 ffe0",  # cmp eax,7; ja; jmp rax: rax is no table entry
    "488d1500000000 48630482 4801d0 ffe0",  # lea; movslq; add; jmp: no bound
])
def test_indirect_jmps_that_are_no_switch_stay_refused(hexcode):
    code = bytes.fromhex("4883ec08 48897c2408" + hexcode.replace(" ", "") + "c3")
    address = 0x7F12_3400_1000
    r = find_region(code, address, len(code), address, lambda a, n: bytes(n))
    assert isinstance(r, Refusal) and r.kind is RefusalKind.INDIRECT_JUMP, r
