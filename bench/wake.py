"""How soon a blocked Tracee.wait() returns after wake() from a signal handler, in one run.

    python -m bench.wake [--rounds R] [--delay-ms MS]

A traced program runs freely (it never stops), so wait() blocks; a timer thread sends this
process SIGUSR2 after MS ms, and the handler calls tracee.wake(). Per round: the timer's own delay
until the handler ran (the reference), and how long wait() took to return a WAKE event after the
handler. tests/tracee/test_freeze_threads.py::test_wake_from_a_signal_handler_ends_a_blocked_wait
used to assert that wait() blocked at least 150 ms of the 200.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time

from pyprobes.tracee import EventKind, Tracee

from .build import BuildError, compile_cached

WORKLOAD = rb"""
#include <unistd.h>
int main(void) { char c; while (read(0, &c, 1) > 0) {} return 0; }
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.wake", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--delay-ms", type=float, default=200)
    args = ap.parse_args(argv)
    try:
        exe = compile_cached("waitstdin", WORKLOAD, ["-O1"])
    except BuildError as e:
        sys.exit(f"bench.wake: {e}")
    r, w = os.pipe()
    saved = os.dup(0)
    try:
        os.dup2(r, 0)
        tracee = Tracee.spawn([str(exe)])
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(r)
    fired: list[float] = []
    old = signal.signal(signal.SIGUSR2, lambda *_: (fired.append(time.perf_counter()), tracee.wake()))
    delays, latencies = [], []
    try:
        tracee.thaw()
        for _ in range(args.rounds):
            fired.clear()
            timer = threading.Timer(args.delay_ms / 1000, os.kill, (os.getpid(), signal.SIGUSR2))
            start = time.perf_counter()
            timer.start()
            event = tracee.wait()
            end = time.perf_counter()
            timer.join()
            if event.kind is not EventKind.WAKE or len(fired) != 1:
                print(f"wait() returned {event} with {len(fired)} wakes", file=sys.stderr)
                return 1
            delays.append(fired[0] - start)
            latencies.append(end - fired[0])
    finally:
        signal.signal(signal.SIGUSR2, old)
        os.close(w)
        tracee.run_to_exit()

    def row(label: str, values: list[float]) -> str:
        return (f"| {label} | {statistics.median(values) * 1e3:.3f} | {min(values) * 1e3:.3f} | "
                f"{max(values) * 1e3:.3f} |")

    print(f"{args.rounds} rounds, timer {args.delay_ms:g} ms\n")
    print("| interval | median ms | min ms | max ms |")
    print("| --- | ---: | ---: | ---: |")
    print(row("timer start to the handler (reference)", delays))
    print(row("handler's wake() to wait() returning WAKE", latencies))
    print(row("wait() blocked in all", [d + l for d, l in zip(delays, latencies)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
