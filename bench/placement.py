"""Placement: how soon probes are in, from the moment the tool is started.

    python bench/placement.py [--repeats R] [--quick] [--bpftrace-limit SECONDS]

Rows (each the median of R runs, with min-max; every run a fresh tool process, as a user types it):
  1 probe, spawned    `pyprobes count -v tick -- work`: until the -v line saying the probe is in
                      (armed), and until the workload's first call ran with it (first hit: the
                      workload prints "first" after its first call to tick; pyprobes holds it until
                      its probes are in).
                      bpftrace -c work: until "Attaching 1 probe...", until BEGIN runs (every probe
                      attached), and until the workload prints "first".
  1 probe, -p PID     the same, attached to the running workload.
  libc:str*, -p PID   every libc function whose name starts with str.
  libc:*, -p PID      every function of libc; then the time from Ctrl-C to a clean detach.
bpftrace runs where it runs (root, bpftrace installed); each of its runs is cut at
--bpftrace-limit seconds (default 60), and reported as such: bpftrace 0.17 attaches one kernel
uprobe per function (~0.1 s each here), and stops at the first it cannot attach.

The workload (compiled once into ~/.cache/pyprobes-bench): calls tick(i) and getppid() every
millisecond. Times include starting the tool (Python and its imports, for pyprobes).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    from .build import BuildError, compile_cached
except ImportError:  # run as a script: python bench/...
    from build import BuildError, compile_cached

REPO = Path(__file__).resolve().parent.parent
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"

WORKLOAD = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

volatile long sink;

__attribute__((noinline)) void tick(long i) { sink += i; }

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000000L;
    printf("ready\n");
    fflush(stdout);
    for (long i = 0; i < n; i++) {
        tick(i);
        if (getppid() == 0)
            return 1;
        if (i == 0) {
            printf("first\n");
            fflush(stdout);
        }
        usleep(1000);
    }
    return 0;
}
"""


def build() -> Path:
    try:
        return compile_cached("placework", WORKLOAD.encode(), ["-O1", "-g"])
    except BuildError as e:
        sys.exit(f"bench/placement.py: {e}")


def pyprobes_command() -> list[str]:
    script = Path(sys.executable).with_name("pyprobes")
    if script.exists():
        return [str(script)]
    env_path = shutil.which("pyprobes")
    return [env_path] if env_path else [sys.executable, "-m", "pyprobes"]


# ---------------------------------------------------------------- timing a tool's output
@dataclass
class Watch:
    """A process whose output lines are time-stamped (seconds since it was started) as they come."""

    argv: list[str]
    env: dict[str, str] | None = None
    lines: list[tuple[float, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        self._threads = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for t in self._threads:
            t.start()

    def _read(self, stream, name: str) -> None:
        for raw in iter(stream.readline, b""):
            now = time.monotonic() - self.start
            with self._cond:
                self.lines.append((now, name, raw.decode(errors="replace").rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self.lines.append((time.monotonic() - self.start, name, None))
            self._cond.notify_all()

    def first(self, pattern: str, timeout: float) -> tuple[float, str] | None:
        """When a line matching PATTERN came (and the line), or None at TIMEOUT or end of output."""
        rx = re.compile(pattern)
        deadline = self.start + timeout
        with self._cond:
            seen = 0
            while True:
                for t, _, line in self.lines[seen:]:
                    if line is not None and rx.search(line):
                        return t, line
                seen = len(self.lines)
                ended = sum(1 for _, _, line in self.lines if line is None) == 2
                left = deadline - time.monotonic()
                if ended or left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def interrupt(self) -> float:
        """SIGINT to the tool alone; seconds until it exited."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.wait(60)
        return time.monotonic() - t0

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for t in self._threads:
            t.join(5)

    def text(self) -> str:
        return "\n".join(line for _, _, line in self.lines if line is not None)


class Workload:
    """The workload running on its own, to attach to."""

    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        if self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError("the workload did not start")

    def __enter__(self) -> int:
        return self.proc.pid

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------- one measurement each
Result = dict[str, float | str]


def pyprobes_spawn(exe: Path) -> Result:
    w = Watch([*pyprobes_command(), "count", "-v", "tick", "--", str(exe), "3"])
    armed = w.first(r"^pyprobes: tick -> ", 30)
    first = w.first(r"^first$", 30)
    w.wait(30)
    if armed is None or first is None:
        raise RuntimeError(f"pyprobes count failed:\n{w.text()}")
    return {"armed": armed[0], "first hit": first[0]}


def pyprobes_attach(exe: Path, spec: str, limit: float) -> Result:
    with Workload(exe) as pid:
        w = Watch([*pyprobes_command(), "count", "-v", "-p", str(pid), spec])
        if any(c in spec for c in "*?["):
            done = w.first(rf"^pyprobes: {re.escape(spec)}: (\d+) probes placed", limit)
        else:
            done = w.first(rf"^pyprobes: {re.escape(spec)} -> ", limit)
        if done is None:
            w.interrupt()
            raise RuntimeError(f"pyprobes count -p failed:\n{w.text()[-2000:]}")
        result: Result = {"armed": done[0]}
        m = re.search(r"(\d+) probes placed", done[1])
        result["probes"] = m.group(1) if m else "1"
        left_out = w.first(r"matching functions cannot be probed", 0.01)
        if left_out is not None:
            result["note"] = left_out[1].split(": ", 2)[-1].split(" and were")[0]
        result["detach"] = w.interrupt()
        if w.proc.returncode != 0:
            raise RuntimeError(f"pyprobes count -p exited {w.proc.returncode}:\n{w.text()[-2000:]}")
    return result


def bpftrace_env() -> dict[str, str]:
    return dict(os.environ, BPFTRACE_MAX_PROBES="100000")


def bpftrace_spawn(exe: Path, limit: float) -> Result:
    program = f'uprobe:{exe}:tick {{ @ = count(); }} BEGIN {{ printf("attached\\n"); }}'
    w = Watch(["bpftrace", "-e", program, "-c", f"{exe} 3"], env=bpftrace_env())
    attaching = w.first(r"^Attaching \d+ probe", limit)
    begin = w.first(r"^attached$", limit)
    first = w.first(r"^first$", limit)
    w.interrupt() if first is None else w.wait(30)
    if first is None:
        raise RuntimeError(f"bpftrace failed:\n{w.text()[-1500:]}")
    return {"attaching": attaching[0] if attaching else float("nan"), "armed": begin[0] if begin else float("nan"),
            "first hit": first[0]}


def bpftrace_attach(exe: Path, target: str, limit: float) -> Result:
    program = f'uprobe:{target} {{ @ = count(); }} BEGIN {{ printf("attached\\n"); exit(); }}'
    with Workload(exe) as pid:
        w = Watch(["bpftrace", "-p", str(pid), "-e", program], env=bpftrace_env())
        attaching = w.first(r"^Attaching (\d+) probe", limit)
        begin = w.first(r"^attached$|^ERROR: Error attaching", limit)
        result: Result = {}
        if attaching is not None:
            result["attaching"] = attaching[0]
            result["probes"] = str(int(re.search(r"(\d+)", attaching[1]).group(1)) - 1)  # not BEGIN
        if begin is None:
            result["armed"] = f"> {limit:g} s (cut)"
            result["detach"] = w.interrupt()
        elif begin[1].startswith("ERROR"):
            result["armed"] = f"failed at {begin[0]:.1f} s"
            result["note"] = begin[1].replace("ERROR: Error attaching probe: ", "cannot attach ")
            w.wait(limit)
        else:
            result["armed"] = begin[0]
            w.wait(limit)
    return result


# ---------------------------------------------------------------- the table
def summarize(runs: list[Result], key: str) -> str:
    values = [r[key] for r in runs if key in r]
    if not values:
        return "-"
    numbers = [v for v in values if isinstance(v, float) and v == v]
    if len(numbers) != len(values):
        return str(values[0])
    med = statistics.median(numbers)
    if len(numbers) == 1:
        return f"{med:.3f} s"
    return f"{med:.3f} s ({min(numbers):.3f}-{max(numbers):.3f})"


def measure(name: str, tool: str, fn, repeats: int, rows: list[list[str]]) -> None:
    runs: list[Result] = []
    error = None
    for _ in range(repeats):
        try:
            runs.append(fn())
        except Exception as e:  # a tool that cannot do it: say so in the table
            error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            break
    if not runs:
        rows.append([name, tool, "-", f"failed: {error}", "-", "-", ""])
        return
    note = next((str(r["note"]) for r in runs if "note" in r), "")
    rows.append([name, tool, str(runs[0].get("probes", "1")), summarize(runs, "armed"),
                 summarize(runs, "first hit"), summarize(runs, "detach"), note])
    print(f"  {name:<24} {tool:<9} done ({len(runs)} run{'s' * (len(runs) != 1)})", file=sys.stderr, flush=True)


def print_table(rows: list[list[str]]) -> None:
    header = ["what", "tool", "probes", "all armed", "first hit", "detach", "note"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs per row (default 5)")
    ap.add_argument("--quick", action="store_true", help="3 runs per row, 1 for libc:*")
    ap.add_argument("--bpftrace-limit", type=float, default=60.0, metavar="SECONDS",
                    help="cut each bpftrace run after SECONDS (default 60)")
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    exe = build()
    bpftrace = shutil.which("bpftrace") if os.geteuid() == 0 else None
    rows: list[list[str]] = []
    print(f"bench/placement.py: {repeats} runs per row; workload {exe}", file=sys.stderr)
    measure("1 probe, spawned", "pyprobes", lambda: pyprobes_spawn(exe), repeats, rows)
    if bpftrace:
        measure("1 probe, spawned", "bpftrace", lambda: bpftrace_spawn(exe, args.bpftrace_limit), repeats, rows)
    measure("1 probe, -p PID", "pyprobes", lambda: pyprobes_attach(exe, "tick", 30), repeats, rows)
    if bpftrace:
        measure("1 probe, -p PID", "bpftrace", lambda: bpftrace_attach(exe, f"{exe}:tick", args.bpftrace_limit),
                repeats, rows)
    measure("libc:str*, -p PID", "pyprobes", lambda: pyprobes_attach(exe, "libc:str*", 60), repeats, rows)
    if bpftrace:
        measure("libc:str*, -p PID", "bpftrace",
                lambda: bpftrace_attach(exe, f"{LIBC}:str*", args.bpftrace_limit), 1, rows)
    measure("libc:*, -p PID", "pyprobes", lambda: pyprobes_attach(exe, "libc:*", 300),
            1 if args.quick else repeats, rows)
    if bpftrace:
        measure("libc:*, -p PID", "bpftrace", lambda: bpftrace_attach(exe, f"{LIBC}:*", args.bpftrace_limit), 1, rows)
    else:
        rows.append(["bpftrace rows", "bpftrace", "-", "not run: needs root and bpftrace", "-", "-", ""])
    print()
    print_table(rows)
    print("\ntimes from the tool's start; median (min-max) over the runs; bpftrace: one run for the "
          "libc rows (each takes up to --bpftrace-limit); 'all armed' for bpftrace is when its BEGIN "
          "probe ran, after attaching every uprobe")
    return 0


if __name__ == "__main__":
    sys.exit(main())
