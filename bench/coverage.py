"""Coverage of jump-optimised probes: how many function entries a 5-byte jmp can take.

    python bench/coverage.py [--top N] [ELF ...]

Default files: the machine's libc.so.6 and python3.11 (/usr/bin/python3.11, else the first
python3.11 on PATH that is an ELF file); a missing one is skipped. For every function entry
(one symbol per address, size > 0, FUNC or IFUNC, gcc's NAME.cold fragments left out as
`pyprobes list` does), at link-time addresses read from the file:

  int3        a breakpoint probe can take it: classify() does not refuse its first instruction
              (the reference: what pyprobes probes today)
  optimised   x86/optimize.py's find_region() finds a region for a probe at the entry, given
              the file's data: a switch's indirect jmp (x86/jumptable.py) is allowed, its
              table's entries checked as branch targets
  +ind. jmp   optimised, or refused only because the function has an indirect jmp that is no
              recognised switch (the last rule checked): the coverage if that rule were lifted
  no tables   find_region() without the file's data: every indirect jmp refuses (the kernel's
              rule), as before switch tables were read

Not applied here: the module-wide sweep (a branch from another function into the patched
bytes), which `pyprobes list` (engine/plan.py) adds.

then the most frequent refusal reasons, addresses and instruction details folded together.
Placement can still fail where a trampoline page cannot be mapped within ±2 GiB; that is not
counted here.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pyprobes.symbols import CodeReader, ElfFile  # noqa: E402
from pyprobes.symbols.elf import ElfError, Symbol, preference  # noqa: E402
from pyprobes.x86 import Kind, Refusal, RefusalKind, Region, classify, find_region, instruction_at  # noqa: E402

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
PYTHON = "/usr/bin/python3.11"


def default_files() -> list[str]:
    files = [LIBC]
    python = PYTHON if os.path.exists(PYTHON) else shutil.which("python3.11")
    if python is not None:
        files.append(os.path.realpath(python))
    return files


def entries(elf: ElfFile) -> list[Symbol]:
    chosen: dict[int, Symbol] = {}
    for sym in elf.functions:
        if sym.size <= 0 or ".cold" in sym.name:
            continue
        old = chosen.get(sym.address)
        if old is None or preference(sym) < preference(old):
            chosen[sym.address] = sym
    return [chosen[a] for a in sorted(chosen)]


def fold(refusal: Refusal) -> str:
    """One refusal reason with its particulars (addresses, instruction operands) folded away."""
    text = refusal.reason
    if refusal.kind in (RefusalKind.CONTROL_FLOW, RefusalKind.NOT_RELOCATABLE):
        mnemonic = re.match(r"'([^\s']+)", text)
        detail = text.split("breakpoint): ", 1)[1] if "breakpoint): " in text else text.split(": ", 1)[-1]
        detail = re.split(r"[:;,(]", detail, maxsplit=1)[0].strip()
        return f"{refusal.kind.value}: {mnemonic.group(1) if mnemonic else '?'} ({detail})"
    text = re.sub(r"'[^']*'", "'...'", text)
    text = re.sub(r"0x[0-9a-f]+", "X", text)
    text = re.sub(r"\b\d+ bytes\b", "N bytes", text)
    return f"{refusal.kind.value}: {text}"


def measure(path: str) -> tuple[int, int, int, int, int, Counter, float]:
    """(functions, int3-probeable, optimised, optimised but for indirect jmps, optimised with
    no tables read, reasons, seconds)."""
    began = time.perf_counter()
    elf = ElfFile.load_with_debug(path)
    code = CodeReader(elf)
    total = int3 = optimised = indirect = tableless = 0
    reasons: Counter = Counter()
    for sym in entries(elf):
        try:
            data = code.read(sym.address, sym.size)
        except (ValueError, ElfError):
            continue
        if len(data) < sym.size:
            continue
        total += 1
        if classify(instruction_at(data, sym.address, sym.address)).kind is not Kind.REFUSE:
            int3 += 1
        if isinstance(find_region(data, sym.address, sym.size, sym.address), Region):
            tableless += 1
        region = find_region(data, sym.address, sym.size, sym.address, code.read)
        if isinstance(region, Refusal):
            reasons[fold(region)] += 1
            if region.kind is RefusalKind.INDIRECT_JUMP:
                indirect += 1
        else:
            optimised += 1
    return total, int3, optimised, optimised + indirect, tableless, reasons, time.perf_counter() - began


def percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="ELF files (default: libc.so.6 and python3.11)")
    parser.add_argument("--top", type=int, default=8, help="refusal reasons shown per file")
    args = parser.parse_args(argv)
    files = args.files or default_files()

    results = []
    for path in files:
        if not os.path.exists(path):
            print(f"skipped {path}: not found", file=sys.stderr)
            continue
        try:
            results.append((path, *measure(path)))
        except (ElfError, OSError) as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)

    print("| file | function entries | int3 probe (reference) | optimised, no tables read | optimised "
          "| optimised, indirect-jmp rule lifted |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for path, total, int3, optimised, lifted, tableless, _, _ in results:
        print(f"| {os.path.basename(path)} | {total} | {int3} ({percent(int3, total)}) | "
              f"{tableless} ({percent(tableless, total)}) | {optimised} ({percent(optimised, total)}) | "
              f"{lifted} ({percent(lifted, total)}) |")
    for path, total, _, optimised, _, _, reasons, seconds in results:
        refused = total - optimised
        print(f"\n{os.path.basename(path)} ({path}): {refused} refused, analysed in {seconds:.1f} s")
        print("\n| refusals | share of entries | reason |")
        print("| ---: | ---: | --- |")
        for reason, count in reasons.most_common(args.top):
            print(f"| {count} | {percent(count, total)} | {reason} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
