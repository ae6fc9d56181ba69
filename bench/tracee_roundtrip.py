#!/usr/bin/env python3
"""What one stop costs from Python, and what freezing a whole process costs.

    python bench/tracee_roundtrip.py [--quick]

Measured in one run, side by side (compare inside a run, never across runs):
  - the unprobed loop (bench/tracee_bench.c, `nop`): the baseline;
  - a pure stop-and-resume round trip: the program executes `int3` in a loop, the tracer
    resumes each SIGTRAP stop with no signal -- once through raw os.waitpid + ctypes
    PTRACE_CONT (the floor for Python), once through Tracee.wait()/resume() (the layer);
  - freeze() + thaw() of a process of 1, 8 and 64 threads, idle (sleeping 1 ms at a time)
    and busy (spinning), timed per cycle.
Round trips: median and min-max over the runs' averages. Freeze/thaw: median and min-max
over single cycles.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from pyprobes.tracee import EventKind, ProcessExited, Tracee  # noqa: E402
from pyprobes.tracee import ptrace  # noqa: E402

SOURCE = HERE / "tracee_bench.c"


# ----------------------------------------------------------------------------- building
def build() -> Path:
    gcc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        sys.exit("no C compiler: install gcc")
    flags = ["-O2", "-pthread"]
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(flags).encode()).hexdigest()[:16]
    root = Path(os.environ.get("PYPROBES_BENCH_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyprobes-bench")
    exe = root / f"tracee_bench-{key}"
    if not exe.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        subprocess.run([gcc, *flags, "-o", str(tmp), str(SOURCE)], check=True)
        os.replace(tmp, exe)
    return exe


# ----------------------------------------------------------------------------- helpers
class Spawned:
    """A traced workload whose stdout we read from a pipe."""

    def __init__(self, argv: list[str]) -> None:
        r, w = os.pipe()
        saved = os.dup(1)
        try:
            os.dup2(w, 1)
            try:
                self.tracee = Tracee.spawn([str(a) for a in argv])
            finally:
                os.dup2(saved, 1)
        finally:
            os.close(saved)
            os.close(w)
        self.fd = r
        self.data = b""

    def read_until(self, pattern: str, seconds: float = 30.0) -> re.Match:
        """Read stdout, handling the tracee's events, until PATTERN appears."""
        os.set_blocking(self.fd, False)
        deadline = time.monotonic() + seconds
        while True:
            m = re.search(pattern, self.data.decode(errors="replace"), re.M)
            if m:
                return m
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {pattern!r} in {self.data!r}")
            self.drain()
            if select.select([self.fd], [], [], 0.001)[0]:
                try:
                    self.data += os.read(self.fd, 65536)
                except BlockingIOError:
                    pass

    def drain(self) -> None:
        t = self.tracee
        while (event := t.wait(block=False)) is not None:
            t.handle_default(event)

    def close(self) -> None:
        if self.tracee.alive:
            try:
                self.tracee.kill()
            except Exception:
                pass
        os.close(self.fd)


def _ns_per_iter(text: str) -> float:
    return float(re.search(r"ns_per_iter ([0-9.]+)", text)[1])


def untraced(exe: Path, mode: str, n: int) -> float:
    out = subprocess.run([str(exe), mode, str(n)], capture_output=True, text=True, check=True).stdout
    return _ns_per_iter(out)


def roundtrip_layer(exe: Path, n: int) -> tuple[float, float]:
    """µs per int3 stop handled through Tracee.wait()/resume(); and the program's own ns/iter."""
    s = Spawned([exe, "int3", n])
    t = s.tracee
    try:
        stops = 0
        t.thaw()
        start = time.perf_counter()
        while True:
            try:
                event = t.wait()
            except ProcessExited:
                break
            if event.kind is EventKind.SIGNAL and event.signal == signal.SIGTRAP:
                stops += 1
                t.resume(event.tid)
            else:
                t.handle_default(event)
        elapsed = time.perf_counter() - start
        if stops != n:
            raise RuntimeError(f"{stops} stops for {n} int3")
        s.data += os.read(s.fd, 65536)
        return elapsed / n * 1e6, _ns_per_iter(s.data.decode())
    finally:
        s.close()


def roundtrip_raw(exe: Path, n: int) -> float:
    """µs per int3 stop with nothing but os.waitpid and a ctypes PTRACE_CONT."""
    s = Spawned([exe, "int3", n])
    pid = s.tracee.pid
    try:
        stops = 0
        start = time.perf_counter()
        ptrace.cont(pid, 0)  # from the exec stop
        while True:
            _, status = os.waitpid(pid, ptrace.WALL)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                break
            if status >> 16 == 0 and os.WSTOPSIG(status) == signal.SIGTRAP:
                stops += 1
            ptrace.cont(pid, 0)
        elapsed = time.perf_counter() - start
        s.tracee.alive = False  # reaped here, behind the layer's back
        if stops != n:
            raise RuntimeError(f"{stops} stops for {n} int3")
        return elapsed / n * 1e6
    finally:
        s.close()


def freeze_thaw(exe: Path, nthreads: int, kind: str, cycles: int) -> tuple[list[float], list[float]]:
    """Per-cycle µs of freeze() and of thaw() on a process of NTHREADS threads."""
    s = Spawned([exe, "threads", nthreads, kind])
    t = s.tracee
    try:
        t.thaw()
        stop = int(s.read_until(r"^ready (0x[0-9a-f]+)$")[1], 16)
        freezes, thaws = [], []
        for _ in range(cycles):
            a = time.perf_counter()
            snap = t.freeze()
            b = time.perf_counter()
            t.thaw()
            c = time.perf_counter()
            if len(snap.tids) != nthreads:
                raise RuntimeError(f"froze {len(snap.tids)} threads of {nthreads}")
            freezes.append((b - a) * 1e6)
            thaws.append((c - b) * 1e6)
            s.drain()
            time.sleep(0.0005)  # let every thread run again before the next freeze
        t.freeze()
        t.memory.write(stop, (1).to_bytes(4, "little"))
        code = t.run_to_exit()
        if code != 0:
            raise RuntimeError(f"workload exited with {code}")
        return freezes, thaws
    finally:
        s.close()


# ----------------------------------------------------------------------------- report
def fmt(value: float, unit: str = "") -> str:
    text = f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"
    return f"{text} {unit}" if unit else text


def spread(values: list[float], unit: str) -> tuple[str, str]:
    return fmt(statistics.median(values), unit), f"{fmt(min(values))}–{fmt(max(values), unit)}"


def machine() -> list[str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gcc = subprocess.run([shutil.which("gcc") or "cc", "--version"], capture_output=True, text=True).stdout
    return [
        f"machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}",
        f"python {platform.python_version()} ({sys.executable}); {gcc.splitlines()[0] if gcc else 'gcc ?'}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="fewer stops and cycles (a smoke run)")
    parser.add_argument("--runs", type=int, default=5, help="runs per round-trip measurement")
    args = parser.parse_args(argv)
    n_stops = 5_000 if args.quick else 20_000
    runs = 3 if args.quick else args.runs
    cycles = 50 if args.quick else 300

    print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv))
    for line in machine():
        print(line)
    exe = build()
    print(f"workload: {exe} (from {SOURCE.relative_to(HERE.parent)})")
    print()

    base = [untraced(exe, "nop", 100_000_000) for _ in range(runs)]
    raw = [roundtrip_raw(exe, n_stops) for _ in range(runs)]
    layer_runs = [roundtrip_layer(exe, n_stops) for _ in range(runs)]
    layer = [r[0] for r in layer_runs]
    own = [r[1] / 1000 for r in layer_runs]

    rows = [
        ("unprobed loop iteration (nop)", *spread(base, "ns"), f"{runs} runs of 10^8"),
        ("int3 stop + resume: os.waitpid + ctypes PTRACE_CONT", *spread(raw, "µs"),
         f"{runs} runs of {n_stops} stops"),
        ("int3 stop + resume: Tracee.wait() + resume()", *spread(layer, "µs"),
         f"program's own view: {statistics.median(own):.2f} µs/iter"),
    ]
    ft_rows = []
    for nthreads in (1, 8, 64):
        for kind in ("idle", "busy"):
            freezes, thaws = freeze_thaw(exe, nthreads, kind, cycles)
            both = [f + t for f, t in zip(freezes, thaws)]
            med, rng = spread(both, "µs")
            ft_rows.append((f"freeze + thaw, {nthreads} thread{'s' if nthreads > 1 else ''}, {kind}", med, rng,
                            f"freeze {fmt(statistics.median(freezes), 'µs')}, "
                            f"thaw {fmt(statistics.median(thaws), 'µs')}; {cycles} cycles"))

    header = ("measurement", "median", "min–max", "notes")
    table = rows + ft_rows
    widths = [max(len(str(r[i])) for r in table + [header]) for i in range(4)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        print(line(r))
    print()
    print(f"The layer's share of a round trip: {statistics.median(layer) - statistics.median(raw):.2f} µs "
          "(layer minus raw, medians; it reads RIP and the siginfo of each SIGTRAP to tell\n"
          "a breakpoint from the program's own trap).")
    print("busy: threads spin, so once thaw() has resumed some of them they compete with the tracer for\n"
          f"the {os.cpu_count()} CPUs and the remaining PTRACE_CONT calls wait for the scheduler; idle threads\n"
          "sleep 1 ms at a time, so freeze() mostly interrupts threads blocked in nanosleep.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
