"""Stripped binaries: .eh_frame bounds every function, so `prog:0xADDR` can be checked and probed."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import pyprobes
from pyprobes.symbols import ElfFile, resolve, symbolize
from pyprobes.symbols.maps import modules
from pyprobes.x86 import instruction_at

ITER = 7
NAME = "sym_stripped"


def nm_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (address, size) of the defined functions nm reports."""
    out = subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True, text=True,
                         check=True).stdout
    funcs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "Tt":
            funcs[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return funcs


def _stripped_copy(exe: Path, directory: Path) -> Path:
    if shutil.which("strip") is None:
        pytest.skip("strip is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / NAME
    shutil.copy(exe, out)
    subprocess.run(["strip", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def unstripped(build) -> Path:
    return build("sym_stripped.c")


@pytest.fixture(scope="session")
def stripped(unstripped, tmp_path_factory) -> Path:
    return _stripped_copy(unstripped, tmp_path_factory.mktemp("stripped"))


@pytest.fixture(scope="session")
def stripped_rdynamic(build, tmp_path_factory) -> tuple[Path, Path]:
    """(unstripped, stripped) built with -rdynamic: .dynsym names main and stripped_work, not
    the static stripped_other."""
    exe = build("sym_stripped.c", "-rdynamic", output="sym_stripped_rdynamic")
    return exe, _stripped_copy(exe, tmp_path_factory.mktemp("stripped_rdynamic"))


@pytest.fixture(scope="session")
def no_section_headers(stripped, tmp_path_factory) -> Path:
    """The stripped program with its section headers gone too (as sstrip leaves it)."""
    out = tmp_path_factory.mktemp("sstripped") / NAME
    data = bytearray(stripped.read_bytes())
    struct.pack_into("<Q", data, 0x28, 0)      # e_shoff
    struct.pack_into("<HH", data, 0x3C, 0, 0)  # e_shnum, e_shstrndx
    out.write_bytes(data)
    return out


def test_a_stripped_program_lists_its_functions_by_their_frames(unstripped, stripped):
    elf = ElfFile.load(stripped)
    assert not elf.has_symtab
    by_address = {s.address: s for s in elf.functions}
    for name, (address, size) in nm_sizes(unstripped).items():
        if name in ("stripped_work", "stripped_other", "main"):
            sym = by_address[address]
            assert (sym.name, sym.size, sym.binding) == (f"0x{address:x}", size, "local"), name
    assert elf.functions == elf.frame_functions and elf.frame_error is None
    assert not any(s.name.startswith("0x") for s in ElfFile.load(unstripped).functions)


def plt_ranges(path: Path) -> list[tuple[int, int]]:
    out = subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"\s(\.plt\S*)\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", out)
    return [(int(a, 16), int(a, 16) + int(n, 16)) for _name, a, n in found]


def test_frames_are_found_without_section_headers(stripped, no_section_headers):
    with_headers = ElfFile.load(stripped).frame_functions
    without = ElfFile.load(no_section_headers).frame_functions
    # Without section headers nothing says where the PLT is: its stubs' FDEs stay.
    plt = plt_ranges(stripped)
    assert plt and set(with_headers) <= set(without)
    assert all(any(lo <= s.address < hi for lo, hi in plt) for s in set(without) - set(with_headers))
    assert not any(any(lo <= s.address < hi for lo, hi in plt) for s in with_headers)


def test_code_no_symbol_covers_falls_back_on_its_frame(stripped_rdynamic):
    exe, stripped_exe = stripped_rdynamic
    elf = ElfFile.load(stripped_exe)
    assert [s.name for s in elf.lookup("stripped_work")] == ["stripped_work"]
    assert elf.lookup("stripped_other") == []
    address, size = nm_sizes(exe)["stripped_other"]
    inside = elf.function_containing(address + 1)
    assert (inside.name, inside.address, inside.size) == (f"0x{address:x}", address, size)
    work, work_size = nm_sizes(exe)["stripped_work"]
    assert elf.function_containing(work + work_size - 1).name == "stripped_work"


def test_pyprobes_list_on_a_stripped_program(unstripped, stripped):
    out = subprocess.run([sys.executable, "-m", "pyprobes", "list", str(stripped)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    address, size = nm_sizes(unstripped)["stripped_work"]
    rows = {line.split()[1]: line.split() for line in out.stdout.splitlines()[1:]}
    row = rows[f"0x{address:x}"]
    assert row[:4] == [NAME, f"0x{address:x}", str(size), f"0x{address:x}"]
    assert row[4] in ("boosted", "emulated", "stepped")


def test_resolve_an_address_in_a_running_stripped_program(unstripped, stripped, spawn):
    running = spawn(stripped, "1", "wait")
    address, size = nm_sizes(unstripped)["stripped_work"]
    (target,) = resolve(running.pid, f"{NAME}:0x{address:x}")
    assert target.symbol is not None
    assert (target.symbol.name, target.symbol.size, target.offset) == (f"0x{address:x}", size, 0)
    assert target.name == f"{NAME}:0x{address:x}"
    assert target.address == target.module.to_runtime(address)
    (entry,) = resolve(running.pid, f"{NAME}:0x{address:x}%return")
    assert entry.is_return
    later = symbolize(target.address + size - 1, modules(running.pid))
    assert later.symbol == target.symbol and later.name == f"{NAME}:0x{address:x}+0x{size - 1:x}"


def test_a_probe_on_a_stripped_function_counts_its_calls(unstripped, stripped, procs):
    address, size = nm_sizes(unstripped)["stripped_work"]
    code = ElfFile.load(unstripped).read_vaddr(address, size)
    first = instruction_at(code, address, address)
    run = procs.spawn(stripped, ITER)
    probe = run.proc.probe(f"{NAME}:0x{address:x}")
    if first.length > 1:
        with pytest.raises(pyprobes.ProbeError, match="instruction"):
            run.proc.probe(f"{NAME}:0x{address + 1:x}")
    assert run.finish() == 0
    assert run.results[("stripped_work",)]["calls"] == ITER
    assert probe.hits == ITER
