"""Helpers for the engine tests: symbols and labels of the fixtures, memory and maps of a
process, a thread held in a slot (the fixture processes and `procs`: tests/processes.py and
tests/conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path

from processes import maps, parse_output, read_mem  # noqa: F401 (the tests import them from here)
from pyprobes.symbols import ElfFile


def labels(path: Path) -> dict[str, int]:
    """Every named symbol of the ELF file (functions and plain asm labels): link-time addresses."""
    from elftools.elf.elffile import ELFFile

    found: dict[str, int] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        for sym in symtab.iter_symbols():
            if sym.name and sym["st_shndx"] != "SHN_UNDEF" and sym["st_info"]["type"] in ("STT_FUNC", "STT_NOTYPE"):
                found.setdefault(sym.name, sym["st_value"])
    return found


def spec_of(path: Path, function: str, label: str) -> str:
    """'function+0xOFF' for an asm label inside FUNCTION (probes are placed relative to a symbol)."""
    table = labels(path)
    return f"{function}+{table[label] - table[function]:#x}"


def function_bytes(path: Path, name: str) -> tuple[int, bytes]:
    """(link address, the file's bytes) of function NAME."""
    elf = ElfFile.load(path)
    (sym,) = elf.lookup(name)
    return sym.address, elf.read_vaddr(sym.address, sym.size)


def load_bias(pid: int, path: Path) -> int:
    """Runtime address minus link address of the main executable PATH in process PID."""
    from pyprobes.symbols import modules

    real = os.path.realpath(path)
    for mod in modules(pid):
        if os.path.realpath(mod.path) == real:
            return mod.to_runtime(0)
    raise AssertionError(f"{path} is not mapped in {pid}")


def hold_in_boosted_slot(run, spec):
    """Probe SPEC with a pre-handler that, at the first boosted hit, holds the hitting thread:
    the hit path then sets its RIP to the slot and "resumes" it, which a held thread ignores,
    so it stays stopped at the slot's first byte. Returns (probe, {"tid", "rdi"})."""
    proc = run.proc
    held: dict[str, int] = {}

    def pre(tid, regs):
        if p.point.boosted and not held:  # this hit runs boosted (the first one is stepped)
            proc.tracee.hold(tid)
            held["tid"] = tid
            held["rdi"] = regs.rdi
            proc.stop()

    p = proc.probe(spec, pre=pre)
    run.run_until(r"^ready")
    for _ in range(50):
        if held:
            break
        proc.run(timeout=0.2)
    assert held, "no boosted hit seen"
    return p, held
