"""Corrupt ELF files: a seeded corpus of mutations of real binaries gives only ElfError or a clean
result, and `pyprobes list` on them ends with one line, never a traceback, a hang or a huge
allocation. bench/fuzz_elf.py runs the same mutations for as long as it is given."""
from __future__ import annotations

import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from elf_mutations import Layout, exercise, mutate

SEED = 14
MUTANTS = 360
CLI_EVERY = 45          # `pyprobes list` on every 45th mutant: 8 runs
CLI_MEMORY = 1 << 30    # bytes of address space a `pyprobes list` may use


def corpus(build) -> list[Path]:
    files = [build("sym_stripped.c"), build("sym_lib.c", "-shared", "-fPIC", "-Wl,--default-symver",
                                            output="libsym_versioned.so")]
    true = shutil.which("true")
    if true and Path(true).read_bytes()[:4] == b"\x7fELF":
        files.append(Path(true))
    return files


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CLI_MEMORY, CLI_MEMORY))


def run_list(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyprobes", "list", str(path)], capture_output=True,
                          text=True, timeout=120, preexec_fn=limit_memory)


def check_cli(out: subprocess.CompletedProcess, what: str) -> None:
    assert "Traceback" not in out.stderr and "Error:" not in out.stderr.split(":", 1)[0], \
        f"{what}: {out.stderr[-2000:]}"
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyprobes: "), f"{what}: {out.stderr[-2000:]}"
    else:
        assert out.stdout.startswith("MODULE"), f"{what}: {out.stdout[:200]}"


def test_the_corpus_is_usable_to_begin_with(build):
    for path in corpus(build):
        check_cli(run_list(path), str(path))


def test_mutated_binaries_give_only_elf_errors(build, tmp_path):
    rng = random.Random(SEED)
    originals = [(p, p.read_bytes()) for p in corpus(build)]
    layouts = [Layout.of(data) for _p, data in originals]
    outcomes: dict[str, int] = {}
    cli_checked = 0
    for n in range(MUTANTS):
        k = n % len(originals)
        source, data = originals[k]
        mutant, what = mutate(data, layouts[k], rng)
        path = tmp_path / f"m{n:04d}-{source.name}"
        path.write_bytes(mutant)
        eh = layouts[k].sections.get(b".eh_frame")
        described = f"mutant {n} of {source.name} ({what})"
        try:
            result = exercise(str(path), None if eh is None else (eh[1], eh[2], _vaddr(data, layouts[k], eh[0])))
        except Exception as e:  # noqa: BLE001 - the point: nothing but ElfError may escape
            pytest.fail(f"{described}: {type(e).__name__}: {e}")
        outcomes[result] = outcomes.get(result, 0) + 1
        if n % CLI_EVERY == 0:
            check_cli(run_list(path), described)
            cli_checked += 1
        path.unlink()
    # The corpus exercises both sides: files refused, and files read in spite of damage.
    assert outcomes.get("loaded", 0) > MUTANTS // 10 and outcomes.get("refused at load", 0) > MUTANTS // 10, outcomes
    assert cli_checked == MUTANTS // CLI_EVERY


def _vaddr(data: bytes, layout: Layout, index: int) -> int:
    import struct

    return struct.unpack_from("<Q", data, layout.shoff + index * layout.shentsize + 16)[0]
