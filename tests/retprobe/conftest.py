"""Helpers for the return-probe tests (the fixture processes and `procs`: tests/processes.py and
tests/conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path

from processes import maps, read_mem  # noqa: F401 (the tests import maps from here)


def text_differences(pid: int, exe: Path) -> list[str]:
    """Where PID's mapped executable segments of EXE differ from the file (empty: identical)."""
    from pyprobes.symbols import ElfFile, modules

    real = os.path.realpath(exe)
    (mod,) = [m for m in modules(pid) if os.path.realpath(m.path) == real]
    elf = ElfFile.load(exe)
    diffs = []
    for seg in elf.segments:
        if not seg.flags & 1:  # PF_X
            continue
        want = elf.read_vaddr(seg.vaddr, seg.filesz)
        got = read_mem(pid, mod.to_runtime(seg.vaddr), seg.filesz)
        if got != want:
            at = next(i for i in range(len(want)) if got[i] != want[i])
            diffs.append(f"segment {seg.vaddr:#x}: first difference at +{at:#x}")
    return diffs
