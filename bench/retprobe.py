"""Return probes: per-call cost of an entry probe alone and of an entry+return pair, next to the
kernel's uprobe (tracefs `p:`) and uretprobe (tracefs `r:`), on the same workload, in one run.

    python bench/retprobe.py [--quick] [--repeats R]

The workload: `long hit(long i)` returns i*3+1 (and stores it into a volatile global), called N
times in a loop; its first instruction is `push %rbx`, which pyprobes boosts and kernel uprobes
emulate (either way one trap at the entry, no single-step). The program prints its own ns per call and its
own count of hit's executions. Per call = ns per call probed minus the unprobed median; each row
is run R times, rows interleaved, and the table gives the median and min-max. Every run checks
the tool's count against the workload's own. The kernel rows need root and tracefs; they are
skipped with a message otherwise. Compare rows inside one run only: this machine is noisy.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from .build import BuildError, compile_cached
except ImportError:  # run as a script: python bench/...
    from build import BuildError, compile_cached
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

import pyprobes  # noqa: E402
from pyprobes.symbols import ElfFile  # noqa: E402

try:
    from .spawned import spawned
except ImportError:  # run as a script
    from spawned import spawned

WORKLOAD = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

volatile long sink;
volatile long hit_count;
long hit(long i);

__asm__(
    ".text\n"
    ".globl hit\n"
    ".type hit, @function\n"
    ".p2align 4\n"
    "hit:\n"
    "    push %rbx\n"                      /* boosted by pyprobes, emulated by kernel uprobes */
    "    lea 0x1(%rdi,%rdi,2), %rbx\n"
    "    mov %rbx, sink(%rip)\n"
    "    addq $1, hit_count(%rip)\n"
    "    mov %rbx, %rax\n"
    "    pop %rbx\n"
    "    ret\n"
    ".size hit, .-hit\n"
);

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000, bad = 0;
    double t0 = now_ns();
    for (long i = 0; i < n; i++)
        bad += hit(i) != 3 * i + 1;
    double t1 = now_ns();
    printf("calls=%ld hits=%ld bad=%ld ns_per_call=%.3f\n", n, (long)hit_count, bad, n ? (t1 - t0) / n : 0.0);
    return bad != 0;
}
"""
LINE = re.compile(r"calls=(\d+) hits=(\d+) bad=(\d+) ns_per_call=([0-9.]+)")
TRACEFS = Path("/sys/kernel/tracing")
GROUP = "pyprobes_retbench"


class Skip(Exception):
    pass


def build() -> Path:
    try:
        return compile_cached("retwork", WORKLOAD.encode(), ["-O2"])
    except BuildError as e:
        sys.exit(f"bench/retprobe.py: {e}")


def parse(text: str, n: int) -> tuple[float, int]:
    m = LINE.search(text)
    if not m:
        raise RuntimeError(f"workload printed {text!r}")
    calls, hits, bad, ns = int(m[1]), int(m[2]), int(m[3]), float(m[4])
    if calls != n or hits != n or bad:
        raise RuntimeError(f"workload: calls={calls} hits={hits} bad={bad}, expected {n} and 0")
    return ns, hits


# ---------------------------------------------------------------- the rows
def run_plain(exe: Path, n: int) -> tuple[float, int | None]:
    out = subprocess.run([str(exe), str(n)], capture_output=True, text=True, check=True).stdout
    ns, _ = parse(out, n)
    return ns, None


def run_pyprobes(place: Callable[[pyprobes.Process], Callable[[], int]]):
    def run(exe: Path, n: int) -> tuple[float, int | None]:
        with spawned([str(exe), str(n)]) as (proc, printed):
            count = place(proc)
            code = proc.run()
            if code != 0:
                raise RuntimeError(f"workload exited with {code}")
            ns, hits = parse(printed(), n)
            return ns, count()
    return run


def entry_only(proc):
    p = proc.probe("hit")
    return lambda: p.hits


def entry_with_handler(proc):
    seen = [0]

    def pre(tid, regs):
        seen[0] += regs.rdi >= 0

    p = proc.probe("hit", pre=pre)
    return lambda: seen[0]


def return_pair(proc):
    rp = proc.return_probe("hit")
    return lambda: rp.hits if rp.missed == rp.dropped == 0 else -1


def return_pair_with_handler(proc):
    seen = {"ok": 0}

    def handler(tid, value, ns, x):
        seen["ok"] += value == 3 * x + 1

    rp = proc.return_probe("hit", handler, entry=lambda tid, regs: regs.rdi)
    return lambda: seen["ok"] if rp.missed == rp.dropped == 0 else -1


def tracefs_missing() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if not (TRACEFS / "uprobe_events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
    if not (TRACEFS / "uprobe_events").exists():
        return "no tracefs uprobe_events (kernel without CONFIG_UPROBE_EVENTS, or mount failed)"
    return None


def _tracefs(name: str, text: str, append: bool = True) -> None:
    fd = os.open(TRACEFS / name, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def run_kernel(kinds: tuple[str, ...]):
    """kinds: "p" (uprobe at hit's entry) and/or "r" (uretprobe on hit, with $retval)."""

    def run(exe: Path, n: int) -> tuple[float, int | None]:
        elf = ElfFile.load(exe)
        (sym,) = elf.lookup("hit")
        offset = elf.vaddr_to_offset(sym.address)
        names = []
        try:
            for kind in kinds:
                name = f"{'entry' if kind == 'p' else 'ret'}"
                fetch = " ret=$retval" if kind == "r" else ""
                _tracefs("uprobe_events", f"{kind}:{GROUP}/{name} {exe}:{offset:#x}{fetch}")
                names.append(name)
                _tracefs(f"events/{GROUP}/{name}/enable", "1", append=False)
            ns, _ = run_plain(exe, n)
            profile = (TRACEFS / "uprobe_profile").read_text()
        finally:
            for name in names:
                try:
                    _tracefs(f"events/{GROUP}/{name}/enable", "0", append=False)
                except OSError:
                    pass
            for name in names:
                try:
                    _tracefs("uprobe_events", f"-:{GROUP}/{name}")
                except OSError:
                    pass
        counts = []
        for name in names:
            m = re.search(rf"^\s*{re.escape(str(exe))}\s+{GROUP}/{name}\s+(\d+)", profile, re.M) \
                or re.search(rf"^\s*{re.escape(str(exe))}\s+{name}\s+(\d+)", profile, re.M)
            if not m:
                raise RuntimeError(f"no {name} line in uprobe_profile:\n{profile}")
            counts.append(int(m[1]))
        if len(set(counts)) != 1:
            raise RuntimeError(f"kernel counts differ: {dict(zip(names, counts))}")
        return ns, counts[0]

    return run


@dataclass
class Row:
    tool: str
    what: str
    traps: str
    size: str
    run: Callable[[Path, int], tuple[float, int | None]]
    missing: Callable[[], str | None] = lambda: None


ROWS = [
    Row("unprobed", "the workload alone", "0", "base", run_plain),
    Row("pyprobes", "entry probe, no handler (counts)", "1 stop", "ptrace", run_pyprobes(entry_only)),
    Row("pyprobes", "entry probe, pre-handler reads rdi", "1 stop", "ptrace", run_pyprobes(entry_with_handler)),
    Row("pyprobes", "return probe: entry + return, no handler", "2 stops", "ptrace", run_pyprobes(return_pair)),
    Row("pyprobes", "return probe: entry(rdi) + handler(retval)", "2 stops", "ptrace",
        run_pyprobes(return_pair_with_handler)),
    Row("kernel (tracefs)", "uprobe `p:` at entry", "1 trap", "kernel", run_kernel(("p",)), tracefs_missing),
    Row("kernel (tracefs)", "uretprobe `r:` ($retval)", "entry trap + return", "kernel", run_kernel(("r",)),
        tracefs_missing),
    Row("kernel (tracefs)", "`p:` + `r:` on the same function", "entry trap + return", "kernel",
        run_kernel(("p", "r")), tracefs_missing),
]
SIZES = {"base": (10_000_000, 2_000_000), "ptrace": (20_000, 5_000), "kernel": (200_000, 50_000)}


def fmt(us: float) -> str:
    return f"{us:.3g}" if abs(us) < 100 else f"{us:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller N")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    exe = build()
    sizes = {k: v[1] if args.quick else v[0] for k, v in SIZES.items()}
    results: dict[int, list[tuple[float, int | None]]] = {i: [] for i in range(len(ROWS))}
    errors: dict[int, str] = {}
    skipped: dict[int, str] = {}
    for i, row in enumerate(ROWS):
        why = row.missing()
        if why:
            skipped[i] = why
            print(f"skipping {row.tool} {row.what}: {why}", file=sys.stderr)
    started = time.monotonic()
    for r in range(args.repeats):
        for i, row in enumerate(ROWS):
            if i in skipped or i in errors:
                continue
            n = sizes[row.size]
            try:
                results[i].append(row.run(exe, n))
            except Exception as e:
                errors[i] = f"{type(e).__name__}: {e}"
        print(f"repeat {r + 1}/{args.repeats} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    base = statistics.median(ns for ns, _ in results[0]) if results[0] else 0.0
    print(f"\nReturn probes vs entry probes, workload `hit` (first insn `push %rbx`); "
          f"{os.cpu_count()} CPUs, Linux {os.uname().release}; median of {args.repeats} runs, rows interleaved.")
    print(f"Per call = the workload's ns per call minus the unprobed median ({base:.2f} ns).\n")
    header = ("tool", "what", "traps/stops per call", "N", "per call, µs (median)", "min–max", "counts ok")
    print("| " + " | ".join(header) + " |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for i, row in enumerate(ROWS):
        n = sizes[row.size]
        if i in skipped:
            print(f"| {row.tool} | {row.what} | {row.traps} | {n:,} | skipped: {skipped[i]} | | |")
            continue
        if i in errors:
            print(f"| {row.tool} | {row.what} | {row.traps} | {n:,} | error: {errors[i]} | | |")
            continue
        per = [(ns - base) / 1000 for ns, _ in results[i]]
        if i == 0:
            cell, span = "0 (reference)", f"{min(ns for ns, _ in results[0]):.2f}–{max(ns for ns, _ in results[0]):.2f} ns"
        else:
            cell, span = fmt(statistics.median(per)), f"{fmt(min(per))}–{fmt(max(per))}"
        ok = all(c is None or c == n for _, c in results[i])
        counts = "—" if i == 0 else ("✓" if ok else "✗ " + ",".join(str(c) for _, c in results[i]))
        print(f"| {row.tool} | {row.what} | {row.traps} | {n:,} | {cell} | {span} | {counts} |")
    print(f"\n(took {time.monotonic() - started:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
