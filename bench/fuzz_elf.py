"""The long corrupt-ELF fuzz: tests/symbols/test_elf_fuzz.py's mutations, for as long as it is given.

    .venv/bin/python bench/fuzz_elf.py [--seconds 600] [--seed 1] [--cli-every 25] [FILE ...]

from the repository root. FILEs (default: the test fixtures sym_stripped and a versioned
libsym_lib.so, compiled here, plus /bin/true, libc.so.6 and python3 itself) are mutated with a
seeded generator (the same seed gives the same mutants); each mutant goes through everything
ElfFile offers (tests/symbols/elf_mutations.py: exercise), where only ElfError may come out,
and every CLI_EVERY-th through `python -m pyprobes list FILE` under a 1 GiB address-space
limit, which must end with exit status 0 and a table, or non-zero and one "pyprobes: ..."
line: never a traceback, a MemoryError, or a hang (120 s). A failing mutant is kept under
--keep (default /tmp/pyprobes-elf-fuzz) with what was done to it, and the run goes on; the
exit status is the number of failures (capped at 100).
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "symbols"))

from elf_mutations import Layout, exercise, mutate  # noqa: E402


def compile_fixture(*args, **kwargs) -> Path:
    """tests/conftest.py's compile_fixture (the test fixtures, built and cached as the suite does)."""
    spec = importlib.util.spec_from_file_location("tests_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compile_fixture(*args, **kwargs)

CLI_MEMORY = 1 << 30


def default_corpus() -> list[Path]:
    files = [compile_fixture("sym_stripped.c"),
             compile_fixture("sym_lib.c", "-shared", "-fPIC", "-Wl,--default-symver", output="libsym_versioned.so")]
    for name in ("/bin/true", "/lib/x86_64-linux-gnu/libc.so.6", shutil.which("python3") or ""):
        path = Path(name).resolve() if name else None
        if path and path.is_file() and path.read_bytes()[:4] == b"\x7fELF":
            files.append(path)
    return files


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CLI_MEMORY, CLI_MEMORY))


def cli_problem(path: Path) -> str | None:
    try:
        out = subprocess.run([sys.executable, "-m", "pyprobes", "list", str(path)], capture_output=True,
                             text=True, timeout=120, preexec_fn=limit_memory, cwd=REPO)
    except subprocess.TimeoutExpired:
        return "pyprobes list hung (120 s)"
    lines = out.stderr.strip().splitlines()
    if "Traceback" in out.stderr or "MemoryError" in out.stderr:
        return "pyprobes list: " + out.stderr[-3000:]
    if out.returncode and not (len(lines) == 1 and lines[0].startswith("pyprobes: ")):
        return f"pyprobes list exited {out.returncode} with: {out.stderr[-3000:]}"
    if not out.returncode and not out.stdout.startswith("MODULE"):
        return f"pyprobes list exited 0 without a table: {out.stdout[:300]!r}"
    return None


def eh_frame_of(data: bytes, layout: Layout) -> tuple[int, int, int] | None:
    found = layout.sections.get(b".eh_frame")
    if found is None:
        return None
    index, offset, size = found
    (vaddr,) = struct.unpack_from("<Q", data, layout.shoff + index * layout.shentsize + 16)
    return offset, size, vaddr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cli-every", type=int, default=25, help="run `pyprobes list` on every Nth mutant (0: never)")
    ap.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()) / "pyprobes-elf-fuzz")
    ap.add_argument("files", nargs="*", type=Path)
    args = ap.parse_args()
    originals = [(p, p.read_bytes()) for p in (args.files or default_corpus())]
    layouts = [Layout.of(data) for _p, data in originals]
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz-elf-"))
    outcomes: dict[str, int] = {}
    failures = 0
    n = 0
    deadline = time.monotonic() + args.seconds
    try:
        while time.monotonic() < deadline:
            k = n % len(originals)
            source, data = originals[k]
            mutant, what = mutate(data, layouts[k], rng)
            path = work / f"m{n:07d}-{source.name}"
            path.write_bytes(mutant)
            problem = None
            try:
                result = exercise(str(path), eh_frame_of(data, layouts[k]))
                outcomes[result] = outcomes.get(result, 0) + 1
            except Exception:  # noqa: BLE001 - what the fuzzing looks for
                problem = traceback.format_exc()
            if problem is None and args.cli_every and n % args.cli_every == 0:
                problem = cli_problem(path)
            if problem is not None:
                failures += 1
                if failures > 100:
                    break
                args.keep.mkdir(parents=True, exist_ok=True)
                kept = args.keep / path.name
                shutil.copy(path, kept)
                kept.with_suffix(kept.suffix + ".txt").write_text(f"{what}\n\n{problem}")
                print(f"FAIL {kept}: {what}\n{problem.strip().splitlines()[-1]}", flush=True)
            path.unlink()
            n += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{n} mutants in {args.seconds:.0f} s (seed {args.seed}): {outcomes}; {failures} failures")
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
