"""Return probes: what a call costs with entry + return probed, and the latency each tool reports (issue 12).

    .venv/bin/python -m bench.latency [--calls N] [--repeats R]

bench/latency.c has three functions of known cost, each timed by the program itself: `tiny`
(a 5-byte nop, lea, ret: the kernel's best case for a uprobe, about 2 ns of work), `spin` (a
busy wait of 1 µs) and `nap` (a 1 ms sleep). In one run, for each:

* cost: the program's ns per call unprobed, with pyprobes' in-process return probe (action
  "hist": entry and return both jump-optimised, no stop), and with bpftrace's uprobe +
  uretprobe feeding hist() (the @start[tid] idiom). Per call = probed minus unprobed.
* accuracy: the median latency each reports beside the program's own median per call, unprobed
  (for tiny, the loop's time per call; a clock read costs more than the function). pyprobes'
  in-process numbers have its measured constant overhead subtracted (shown); its median comes
  from buckets 1/8 of an octave wide, so its exact mean is shown too; bpftrace's median is the
  middle of its log2 bucket, so its mean (avg()) is shown too.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from .build import BuildError, compile_cached

HERE = Path(__file__).resolve().parent
LINE = re.compile(r"calls=(\d+) median_ns=(\d+) p10_ns=(\d+) p90_ns=(\d+)")
# calls per function: tiny's cost is nanoseconds, nap's a millisecond
CALLS = {"tiny": 2_000_000, "spin": 20_000, "nap": 300}


def _workload() -> str:
    return str(compile_cached("latency", (HERE / "latency.c").read_bytes(), ["-O2"]))


def _parse(out: str) -> tuple[int, int]:
    m = LINE.search(out)
    if m is None:
        raise RuntimeError(f"no result line in {out!r}")
    return int(m[1]), int(m[2])


def unprobed(exe: str, func: str, n: int) -> int:
    return _parse(subprocess.run([exe, func, str(n)], capture_output=True, text=True, check=True).stdout)[1]


def pyprobes_hist(exe: str, func: str, n: int) -> tuple[int, float, str, float, float]:
    """(program's median ns per call, pyprobes' median latency, mode, overhead subtracted (ns),
    pyprobes' mean latency (its exact sum over the count))."""
    from .spawned import spawned

    with spawned([exe, func, str(n)]) as (proc, printed):
        rp = proc.return_probe(func, action="hist")
        code = proc.run()
        hist = rp.histogram
        mode, overhead = rp.mode, rp.overhead_ns
        calls, own = _parse(printed())
    if code != 0 or rp.hits + rp.missed != calls or hist.count != rp.hits:
        raise RuntimeError(f"{func}: exit {code}, {rp.hits} returns + {rp.missed} missed of {calls} calls")
    return own, hist.percentile(50), mode, overhead, hist.mean


def bpftrace_hist(exe: str, func: str, n: int) -> tuple[int, float, float] | str:
    """(program's median ns per call, median of bpftrace's hist (bucket middle), its avg)."""
    if shutil.which("bpftrace") is None:
        return "bpftrace is not installed"
    if os.geteuid() != 0:
        return "bpftrace needs root"
    script = (f"uprobe:{exe}:{func} {{ @s[tid] = nsecs; }} "
              f"uretprobe:{exe}:{func} /@s[tid]/ {{ @h = hist(nsecs - @s[tid]); "
              f"@a = avg(nsecs - @s[tid]); @n = count(); delete(@s[tid]); }}")
    r = subprocess.run(["bpftrace", "-e", script, "-c", f"{exe} {func} {n}"], capture_output=True,
                       text=True, timeout=900)
    if r.returncode != 0:
        return f"bpftrace failed: {(r.stderr or r.stdout)[-200:]}"
    calls, own = _parse(r.stdout)
    counted = re.search(r"^@n: (\d+)", r.stdout, re.M)
    avg = re.search(r"^@a: (\d+)", r.stdout, re.M)
    if counted is None or int(counted[1]) != calls or avg is None:
        return f"bpftrace saw {counted and counted[1]} returns of {calls}"
    buckets = []
    for lo, lo_unit, hi, hi_unit, count in re.findall(
            r"^\[(\d+)([KMG]?), (\d+)([KMG]?)\)\s+(\d+)", r.stdout, re.M):
        scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        buckets.append((int(lo) * scale[lo_unit], int(hi) * scale[hi_unit], int(count)))
    half, seen, median = calls / 2, 0, float("nan")
    for lo, hi, count in buckets:
        seen += count
        if seen >= half:
            median = (lo + hi) / 2
            break
    return own, median, float(avg[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every function's call count")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        exe = _workload()
    except BuildError as e:
        sys.exit(f"bench.latency: {e}")
    cost_rows, accuracy_rows = [], []
    for func, calls in CALLS.items():
        n = max(int(calls * args.scale), 10)
        base = statistics.median(unprobed(exe, func, n) for _ in range(args.repeats))
        ours = [pyprobes_hist(exe, func, n) for _ in range(args.repeats)]
        own = statistics.median(s[0] for s in ours)
        reported = statistics.median(s[1] for s in ours)
        mode, overhead = ours[0][2], ours[0][3]
        theirs = bpftrace_hist(exe, func, n)
        if isinstance(theirs, str):
            bt_cost, bt_median, bt_avg = theirs, "", ""
            ratio = ""
        else:
            samples = [theirs] + [bpftrace_hist(exe, func, n) for _ in range(args.repeats - 1)]
            samples = [s for s in samples if not isinstance(s, str)]
            bt_own = statistics.median(s[0] for s in samples)
            bt_cost = f"{bt_own - base:.0f}"
            bt_median = f"{statistics.median(s[1] for s in samples):.0f}"
            bt_avg = f"{statistics.median(s[2] for s in samples):.0f}"
            ratio = f"{(own - base) / max(bt_own - base, 1e-9):.3f}x" if func == "tiny" else ""
        mean = statistics.median(s[4] for s in ours)
        # The truth: the program's own median unprobed (probed, its clock also runs through the probes).
        error = (f"{reported - base:+,.0f} ns" if base < 100 else f"{(reported - base) / base * 100:+.1f}%")
        cost_rows.append((func, f"{n:,}", f"{base:,.0f}", f"{own - base:,.0f} ({mode})", bt_cost, ratio))
        accuracy_rows.append((func, f"{base:,.0f}", f"{reported:,.0f}", f"{mean:,.0f}", error,
                              f"{overhead:.0f}", bt_median, bt_avg))
    print(f"bench/latency.c, median of {args.repeats} runs\n")
    print("Cost of a call with its entry and return probed (ns per call, probed minus unprobed):\n")
    print("| function | calls | unprobed ns/call | pyprobes in-process | bpftrace uprobe+uretprobe hist() | pyprobes / bpftrace |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in cost_rows:
        print("| " + " | ".join(row) + " |")
    print("\nReported latency (median, ns) beside the program's own:\n")
    print("| function | program's own, unprobed | pyprobes median | pyprobes mean | pyprobes median's error | overhead pyprobes subtracted | bpftrace hist() median (bucket middle) | bpftrace avg() |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in accuracy_rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
