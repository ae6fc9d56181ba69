"""Timings of the symbol layer (not a test): python tests/symbols/bench_resolve.py [PID]

Resolves against PID (default: this Python process, which maps libc).
"Cold" clears pyprobes' ELF caches first (the OS page cache stays warm).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from pyprobes.symbols import ElfFile, elf, modules, resolve

RUNS = 15


def clear() -> None:
    elf._cache.clear()
    elf._debug_cache.clear()


def measure(label: str, fn, cold: bool) -> None:
    times = []
    for _ in range(RUNS):
        if cold:
            clear()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    print(f"{label:<48} min {min(times) * 1e3:7.1f} ms   median {statistics.median(times) * 1e3:7.1f} ms   ({result})")


def main() -> None:
    pid = int(sys.argv[1]) if len(sys.argv) > 1 else os.getpid()
    mods = modules(pid)
    (libc,) = [m for m in mods if m.name.startswith("libc.so")]
    path = libc.path
    measure("libc .dynsym functions, cold", lambda: len(ElfFile.load(path).functions), cold=True)
    measure("libc + debug-file .symtab functions, cold", lambda: len(ElfFile.load_with_debug(path).functions), cold=True)
    measure("modules(pid), cold (headers only)", lambda: len(modules(pid)), cold=True)
    measure("modules(pid), warm", lambda: len(modules(pid)), cold=False)
    measure("resolve('libc:*'), cold (maps + symbols)", lambda: len(resolve(pid, "libc:*")), cold=True)
    mods = modules(pid)
    measure("resolve('libc:*', modules=snapshot), warm", lambda: len(resolve(pid, "libc:*", modules=mods)), cold=False)
    measure("resolve('libc:puts', modules=snapshot), warm", lambda: len(resolve(pid, "libc:puts", modules=mods)), cold=False)


if __name__ == "__main__":
    main()
