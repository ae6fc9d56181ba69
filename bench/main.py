"""python -m bench: every comparison in one invocation, printed as a markdown table.

    python -m bench [--quick] [--repeats R] [--write] [--only KEY,...] [--cpu N] [--profile]

Each repeat runs every row once, in table order, so slow drifts of the machine spread over all
rows; the table gives the median and min–max over the repeats. Per-hit cost = the workload's own
ns per call, probed, minus the unprobed baseline's median (each loop call is one hit).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .build import BuildError, build
from .tools import REPO, Context, Row, RunError, Sample, rows

HERE = Path(__file__).resolve().parent
SIZES = {  # (default, --quick)
    "base": (10_000_000, 2_000_000),  # the unprobed loop: a few ns per call
    "ptrace": (50_000, 20_000),       # pyprobes and the C floor: 10-100 µs per hit
    "slow": (20_000, 5_000),          # gdb, ltrace: 100-300 µs per hit
    "kernel": (200_000, 50_000),      # kernel uprobes, bpftrace: 0.3-6 µs per hit
}


def machine() -> dict[str, str]:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gcc = subprocess.run([os.environ.get("CC") or "gcc", "--version"], capture_output=True, text=True).stdout
    return {
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "cpu": cpu,
        "python": platform.python_version(),
        "gcc": gcc.splitlines()[0] if gcc else "",
    }


class Result:
    def __init__(self, row: Row, n: int) -> None:
        self.row, self.n = row, n
        self.samples: list[Sample] = []
        self.error: str | None = None
        self.skipped: str | None = None

    def hit_check(self) -> tuple[bool, str]:
        """(exact, text): every run's tool count equals the workload's own count."""
        bad = [s for s in self.samples if s.tool_hits != s.workload_hits or s.workload_hits != s.calls]
        if bad:
            s = bad[0]
            return False, f"✗ {s.tool_hits:,} counted, workload ran {s.workload_hits:,}"
        return True, f"✓ {self.samples[0].workload_hits:,}" if self.samples else ""

    def mode_check(self) -> str | None:
        want = self.row.expect_mode
        wrong = [s.mode for s in self.samples if want and s.mode != want]
        return f"ended {wrong[0]}, not {want}" if wrong else None


def per_hit_us(result: Result, base_ns: float) -> list[float]:
    return [(s.ns_per_call - base_ns) / 1000.0 for s in result.samples]


def fmt_us(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def table(results: list[Result]) -> str:
    by_key = {r.row.key: r for r in results}
    base = by_key.get("baseline")
    base_ns = statistics.median(s.ns_per_call for s in base.samples) if base and base.samples else 0.0
    medians: dict[str, float] = {}
    for r in results:
        if r.samples and r.row.key != "baseline":
            medians[r.row.key] = statistics.median(per_hit_us(r, base_ns))
    out = [
        "| tool | probed instruction · mechanism | stops/hit | N | per hit, µs (median) | min–max | "
        "raw ns/call | tracer CPU/hit, µs user + sys | hits (tool = workload) | × C floor |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        row = r.row
        cells = [row.tool, row.mechanism, row.stops]
        if r.skipped or (r.error and not r.samples):
            reason = r.skipped or f"failed: {r.error.splitlines()[0]}"
            out.append("| " + " | ".join(cells + ["—", reason, "", "", "", "", ""]) + " |")
            continue
        raw = statistics.median(s.ns_per_call for s in r.samples)
        exact, hits = r.hit_check()
        mode = r.mode_check()
        if mode:
            hits += f" ({mode})"
        if r.error:
            hits += f" (a later run failed: {r.error.splitlines()[0]})"
        if row.key == "baseline":
            lo, hi = min(s.ns_per_call for s in r.samples), max(s.ns_per_call for s in r.samples)
            cells += [f"{r.n:,}", "0 (reference)", f"{lo:.2f}–{hi:.2f} ns", f"{raw:.2f}", "", hits, ""]
        else:
            us = per_hit_us(r, base_ns)
            floor_key = row.floor or "c_boost"
            ratio = ""
            if floor_key in medians and medians[floor_key] > 0:
                floor_name = by_key[floor_key].row.mechanism.split("`")[0].strip().split()[0]
                ratio = f"{medians[row.key] / medians[floor_key]:.2f}× C {floor_name}"
            cpu = ""
            if all(s.tracer_user_us is not None for s in r.samples):
                user = statistics.median(s.tracer_user_us for s in r.samples)
                sys_ = statistics.median(s.tracer_sys_us for s in r.samples)
                cpu = f"{fmt_us(user)} + {fmt_us(sys_)}"
            cells += [f"{r.n:,}", fmt_us(statistics.median(us)), f"{fmt_us(min(us))}–{fmt_us(max(us))}",
                      f"{raw:,.0f}", cpu, hits, ratio]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def run_extra(timeout: float) -> str | None:
    """bench/tracee_roundtrip.py (another engineer's), if present with a main(): its output."""
    path = HERE / "tracee_roundtrip.py"
    if not path.exists() or not re.search(r"^def main\(", path.read_text(), re.M):
        return None
    code = "import sys; from bench.tracee_roundtrip import main; r = main(); sys.exit(r if isinstance(r, int) else 0)"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return f"(timed out after {timeout:.0f} s)"
    text = r.stdout.strip()
    if r.returncode != 0:
        text += f"\n\n(exit {r.returncode})\n" + "\n".join(r.stderr.strip().splitlines()[-5:])
    return text


def profile_boosted(ctx: Context, n: int) -> str:
    cmd = [sys.executable, "-m", "bench.pyrun", "hit+6", "--profile", "25", "--", str(ctx.workload.work), str(n)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.timeout, cwd=REPO)
    return (r.stdout + r.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats and smaller N (about a minute)")
    ap.add_argument("--repeats", type=int, help="runs per row (default 5, 3 with --quick)")
    ap.add_argument("--write", action="store_true", help="also write the report to bench/results.md")
    ap.add_argument("--only", help="comma-separated row keys (baseline is always run)")
    ap.add_argument("--list", action="store_true", help="list the row keys and exit")
    ap.add_argument("--cpu", type=int, help="pin the bench, tracers and workloads to this one CPU")
    ap.add_argument("--profile", action="store_true",
                    help="also run pyprobes boosted once under cProfile and print where the time goes")
    ap.add_argument("--no-extra", action="store_true", help="skip bench/tracee_roundtrip.py")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for one run")
    args = ap.parse_args(argv)

    all_rows = rows()
    if args.list:
        for row in all_rows:
            print(f"{row.key:12} {row.tool}: {row.mechanism}")
        return 0
    if args.only:
        keep = {"baseline", *args.only.split(",")}
        unknown = keep - {r.key for r in all_rows}
        if unknown:
            ap.error(f"unknown rows: {', '.join(sorted(unknown))} (see --list)")
        all_rows = [r for r in all_rows if r.key in keep]
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    repeats = args.repeats or (3 if args.quick else 5)
    which = 1 if args.quick else 0
    started = time.monotonic()

    try:
        workload = build()
    except BuildError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    ctx = Context(workload, args.timeout)
    results = [Result(row, SIZES[row.size][which]) for row in all_rows]
    for r in results:
        r.skipped = r.row.missing()

    for rep in range(1, repeats + 1):
        for r in results:
            if r.skipped or r.error:
                continue
            t0 = time.monotonic()
            try:
                sample = r.row.run(ctx, r.n)
            except (RunError, OSError) as e:
                r.error = str(e)
                print(f"[{rep}/{repeats}] {r.row.key}: FAILED {e}", file=sys.stderr)
                continue
            r.samples.append(sample)
            print(f"[{rep}/{repeats}] {r.row.key:12} {sample.ns_per_call:12,.1f} ns/call  "
                  f"hits {sample.tool_hits}/{sample.workload_hits}  ({time.monotonic() - t0:.1f} s)",
                  file=sys.stderr, flush=True)

    info = machine()
    sizes = ", ".join(f"{k} {v[which]:,}" for k, v in SIZES.items())
    pinned = f"; everything pinned to CPU {args.cpu}" if args.cpu is not None else "; not pinned"
    command = "python -m bench" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    report = [
        "# pyprobes benchmark",
        "",
        f"`{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: "
        f"{info['nproc']} CPUs, {info['cpu']}, Linux {info['kernel']}, Python {info['python']}, "
        f"{info['gcc']}.",
        "",
        f"Median and min–max of {repeats} runs per row (rows interleaved){pinned}. N calls of `hit` per run "
        f"({sizes}). Per hit = the workload's own ns per call minus the unprobed median. "
        "Hits: the tool's count checked equal to the workload's own counter in every run. "
        "Tracer CPU: the tracer process's own user and system time per hit (medians; the rest of the wall "
        "time is the tracee's traps and the scheduler). "
        "× C floor: pyprobes rows against the C tracer doing the same class; other rows against C boosted.",
        "",
        table(results),
    ]
    report += ["", f"(the rows took {time.monotonic() - started:.0f} s)"]
    if not args.no_extra:
        extra = run_extra(args.timeout)
        if extra is not None:
            report += ["", "## bench/tracee_roundtrip.py", "", extra]
    text = "\n".join(report) + "\n"
    print(text)
    if args.write:
        (HERE / "results.md").write_text(text)
        print(f"wrote {HERE / 'results.md'}", file=sys.stderr)
    if args.profile:
        print("## cProfile of pyprobes boosted (one run, top 25 by own time)\n\n```")
        print(profile_boosted(ctx, SIZES["ptrace"][which]))
        print("```")
    shutil.rmtree(ctx.tmp, ignore_errors=True)
    failed = any(r.error or (r.samples and (not r.hit_check()[0] or r.mode_check())) for r in results)
    return 1 if failed else 0
