"""Timings of the symbol layer: python -m bench.resolve [--runs R] [PID]

Resolves against PID (default: this Python process, which maps libc). "Cold" clears pyprobes'
ELF caches first (the OS page cache stays warm). The reference row reads libc's file whole: the
I/O any cold resolve of libc pays at least. `resolve('libc:*')` is what tests/symbols/
test_resolve.py::test_libc_star resolves (it used to assert under 1 s).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from pyprobes.symbols import ElfFile, elf, modules, resolve


def clear() -> None:
    """Forget every ELF file pyprobes read (its caches are private: tolerate their absence)."""
    for name in ("_cache", "_debug_cache"):
        cache = getattr(elf, name, None)
        if cache is not None:
            cache.clear()


def measure(label: str, fn, cold: bool, runs: int) -> None:
    times = []
    for _ in range(runs):
        if cold:
            clear()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    print(f"| {label} | {min(times) * 1e3:.1f} | {statistics.median(times) * 1e3:.1f} | {result} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.resolve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("pid", type=int, nargs="?", default=os.getpid())
    args = ap.parse_args(argv)
    pid, runs = args.pid, args.runs
    mods = modules(pid)
    (libc,) = [m for m in mods if m.name.startswith("libc.so")]
    path = libc.path
    print(f"{runs} runs each, PID {pid}, {path}\n")
    print("| what | min ms | median ms | result |")
    print("| --- | ---: | ---: | ---: |")
    measure("read libc's file whole (reference)", lambda: len(Path(path).read_bytes()), False, runs)
    measure("libc .dynsym functions, cold", lambda: len(ElfFile.load(path).functions), True, runs)
    measure("libc + debug-file .symtab functions, cold", lambda: len(ElfFile.load_with_debug(path).functions),
            True, runs)
    measure("modules(pid), cold (headers only)", lambda: len(modules(pid)), True, runs)
    measure("modules(pid), warm", lambda: len(modules(pid)), False, runs)
    measure("resolve('libc:*'), cold (maps + symbols)", lambda: len(resolve(pid, "libc:*")), True, runs)
    mods = modules(pid)
    measure("resolve('libc:*', modules=snapshot), warm", lambda: len(resolve(pid, "libc:*", modules=mods)),
            False, runs)
    measure("resolve('libc:puts', modules=snapshot), warm", lambda: len(resolve(pid, "libc:puts", modules=mods)),
            False, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
