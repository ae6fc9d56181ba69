"""How long should pyprobes poll for the next stop before it sleeps? (Process.busy_wait_us)

    python -m bench.busy_wait [--repeats R] [--budgets 0,10,25,50,100,200]

One boosted probe on bench/work.c's `hit`, three workloads, each budget in turn (rows interleaved
over R repeats, medians shown):
  dense   1 thread calling hit back to back: the per-hit cost the main bench measures
  threads 2 threads calling hit back to back on this 2-CPU machine: polling takes a CPU they want
  sparse  1 thread calling hit every 200 µs: what polling costs when it mostly times out
Per hit: the workload's wall time over its calls (for 2 threads: over both threads' calls).
Tracer CPU: pyprobes' own user + system time per hit.
A second table counts the polls per 1000 hits: caught a stop / timed out / skipped (the back-off
after misses: 1, 3, 7 ... 63 waits without a poll); budget 0, which never polls, is the reference.
At the default budget the dense workload's polls catch stops, and the sparse one's time out and
back off (these used to be assertions of tests/engine/test_busy_wait.py; they depend on speed).
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys

from .build import LEA_OFF, build
from .tools import REPO, WORK_LINE

WORKLOADS = {  # name: (calls per thread, threads, gap between calls in µs)
    "dense": (30_000, 1, 0),
    "threads": (15_000, 2, 0),
    "sparse": (3_000, 1, 200),
}
RESULT = re.compile(r"pyprobes: hits=(\d+) .*user_ns_per_hit=([0-9.]+) sys_ns_per_hit=([0-9.]+)"
                    r"(?: polls=(\d+)/(\d+)/(\d+))?")


def run_one(work: str, budget: float, n: int, threads: int, gap: int
            ) -> tuple[float, float, bool, tuple[float, float, float]]:
    """(µs per hit, tracer CPU µs per hit, count exact, polls caught/timed out/skipped per 1000 hits)."""
    cmd = [sys.executable, "-m", "bench.pyrun", f"hit+{LEA_OFF}", "--busy-wait", str(budget), "--",
           work, str(n), str(threads), str(gap)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    out = r.stdout + r.stderr
    w, p = WORK_LINE.search(out), RESULT.search(out)
    if r.returncode != 0 or w is None or p is None:
        raise RuntimeError(f"exit {r.returncode}: {' '.join(cmd)}\n{out[-800:]}")
    calls, hits, ns_per_call = int(w.group(1)), int(w.group(2)), float(w.group(4))
    per_hit = ns_per_call * n / (n * threads) / 1000  # the loop's wall time over every thread's calls
    cpu = (float(p.group(2)) + float(p.group(3))) / 1000
    per_k = 1000 / max(int(p.group(1)), 1)
    polls = tuple(int(p.group(i) or 0) * per_k for i in (4, 5, 6))
    return per_hit, cpu, int(p.group(1)) == hits == calls, polls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.busy_wait", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budgets", default="0,10,25,50,100,200", help="µs, comma-separated")
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    work = str(build().work)
    results: dict[tuple[str, float], list[tuple[float, float, bool]]] = {}
    for rep in range(args.repeats):
        for name, (n, threads, gap) in WORKLOADS.items():
            for budget in budgets:
                sample = run_one(work, budget, n, threads, gap)
                results.setdefault((name, budget), []).append(sample)
                print(f"[{rep + 1}/{args.repeats}] {name:7} busy_wait={budget:g} µs: {sample[0]:.1f} µs/hit, "
                      f"tracer CPU {sample[1]:.1f} µs/hit", file=sys.stderr, flush=True)
    header = "| busy_wait_us | " + " | ".join(
        f"{name}: µs/hit | {name}: tracer CPU µs/hit" for name in WORKLOADS) + " |"
    print(header)
    print("| ---: |" + " ---: | ---: |" * len(WORKLOADS))
    exact = True
    for budget in budgets:
        cells = [f"{budget:g}"]
        for name in WORKLOADS:
            samples = results[(name, budget)]
            exact &= all(s[2] for s in samples)
            cells += [f"{statistics.median(s[0] for s in samples):.1f}",
                      f"{statistics.median(s[1] for s in samples):.1f}"]
        print("| " + " | ".join(cells) + " |")
    print("\npolls per 1000 hits: caught / timed out / skipped (budget 0 never polls: the reference)\n")
    print("| busy_wait_us | " + " | ".join(WORKLOADS) + " |")
    print("| ---: |" + " ---: |" * len(WORKLOADS))
    for budget in budgets:
        cells = [f"{budget:g}"]
        for name in WORKLOADS:
            samples = results[(name, budget)]
            cells.append(" / ".join(f"{statistics.median(s[3][i] for s in samples):.0f}" for i in range(3)))
        print("| " + " | ".join(cells) + " |")
    print(f"\nmedians of {args.repeats} runs; " + ("hit counts exact in every run" if exact
                                                   else "HIT COUNTS WRONG in some run"))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
