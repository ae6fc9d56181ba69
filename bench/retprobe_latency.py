"""What a return probe reports as a call's duration, next to the program's own clock, in one run.

    python -m bench.retprobe_latency [--calls N] [--ms MS]

The workload calls `nap(MS)` (a clock_nanosleep of MS milliseconds) N times and prints each call's
duration as it measured it (CLOCK_MONOTONIC around the call). pyprobes puts a return probe on
`nap`; its handler gets the call's duration in ns (entry hit to return hit). The reference row is
the program's own; the probe's lies just inside it (the program's clock also runs through the
entry stop and the return stop, the probe's from one to the other). This is
what tests/retprobe/test_values.py::test_elapsed_time_of_a_10ms_sleep used to bound (under 500 ms).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from .build import BuildError, compile_cached
from .spawned import spawned

WORKLOAD = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noinline)) long nap(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    clock_nanosleep(CLOCK_MONOTONIC, 0, &t, NULL);
    return ms + 1;
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = atol(argv[1]), ms = atol(argv[2]);
    for (long i = 0; i < n; i++) {
        long t0 = now_ns();
        long got = nap(ms);
        printf("nap ns %ld got %ld\n", now_ns() - t0, got);
    }
    return 0;
}
"""


def stats(values: list[float]) -> str:
    return (f"{statistics.median(values) / 1e6:.3f} | {min(values) / 1e6:.3f} | {max(values) / 1e6:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.retprobe_latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--ms", type=int, default=10)
    args = ap.parse_args(argv)
    try:
        exe = compile_cached("retlatency", WORKLOAD.encode(), ["-O1"])
    except BuildError as e:
        sys.exit(f"bench.retprobe_latency: {e}")
    durations: list[int] = []
    with spawned([str(exe), str(args.calls), str(args.ms)]) as (proc, printed):
        rp = proc.return_probe("nap", lambda tid, value, ns, data: durations.append(ns))
        code = proc.run()
        own = [int(line.split()[2]) for line in printed().splitlines() if line.startswith("nap ns ")]
    if code != 0 or len(own) != args.calls or len(durations) != args.calls or rp.missed:
        print(f"workload exit {code}, {len(own)} calls printed, {len(durations)} returns seen, "
              f"{rp.missed} missed", file=sys.stderr)
        return 1
    extra = [d - o for d, o in zip(durations, own)]
    print(f"{args.calls} calls of nap({args.ms} ms), traced\n")
    print("| clock | median ms | min ms | max ms |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| the program's own, around the call (reference) | {stats(own)} |")
    print(f"| pyprobes return probe, entry to return | {stats(durations)} |")
    print(f"| difference per call | {stats(extra)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
