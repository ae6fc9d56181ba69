"""Per-hit cost of a jump-optimised count and record probe (issue 11) beside a boosted one and bpftrace.

    .venv/bin/python -m bench.optimized [--calls N] [--threads T] [--repeats R]

On bench/work.c's workload (hit: a 5-byte nop, push %rbx, lea, a volatile store), one table:
the unprobed run, pyprobes count probes with action="count" jump-optimised at hit (the nop5:
the kernel's best case) and at hit+6 (the lea: the kernel single-steps it), a boosted
pyprobes count at hit+5 (push, one ptrace stop per hit), a record probe at hit (drained
every 5 ms: its lost records, and the records per second of the consumer's own time, copying
them out of the ring and decoding them into Records; in one row the ring holds every record
and is drained only after the run: the producer's cost alone, the consumer idle, as
bpftrace's count() has none; on a machine whose CPUs are all busy, a consumer at work takes
CPU from the workload), and, where bpftrace runs, its
`count()` on hit. Per hit = the workload's own ns per call minus the unprobed median; every
row's count is checked equal to the workload's own counter. Fewer calls are made where a hit
costs microseconds (--calls / 50 for the boosted and bpftrace rows).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys

from .build import LEA_OFF, PUSH_OFF, build

SLOW = 50  # the boosted and bpftrace rows make --calls / SLOW calls


def _parse(out: str) -> tuple[int, int, float]:
    m = re.search(r"calls=(\d+) hits=(\d+) sink=-?\d+ ns_per_call=([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"no result line in {out!r}")
    return int(m[1]), int(m[2]), float(m[3])


def unprobed(work: str, n: int, threads: int) -> tuple[float, int]:
    calls, _, ns = _parse(subprocess.run([work, str(n), str(threads)], capture_output=True,
                                         text=True, check=True).stdout)
    return ns, calls


def pyprobes_count(work: str, n: int, threads: int, spec: str, action: str | None) -> tuple[float, int, str]:
    """(ns per call, probe hits, mode), checked against the workload's own count."""
    from .spawned import spawned

    with spawned([work, str(n), str(threads)]) as (proc, printed):
        probe = proc.probe(spec, action=action)
        code = proc.run()
        calls, own, ns = _parse(printed())
    if code != 0 or probe.hits != own or own != calls:
        raise RuntimeError(f"{spec}: exit {code}, {probe.hits} counted, workload ran {own} of {calls}")
    return ns, probe.hits, probe.mode


RECORD_RING = 1 << 16  # records (5 MiB): drained every RECORD_TICK by the record rows' consumer
BIG_RING = 1 << 21     # records (160 MiB): the other record row's ring, all of them fit at 2M calls
RECORD_TICK = 0.005


def pyprobes_record(work: str, n: int, threads: int, spec: str, capacity: int,
                    drain_during: bool = True) -> tuple[float, int, str, int, tuple[float, float]]:
    """(ns per call, records, mode, lost, the consumer's records per second copying them out of
    the ring and decoding them): action="record", drained and decoded every RECORD_TICK while
    the workload runs, or (not DRAIN_DURING) once it has exited, the consumer idle meanwhile;
    records + lost checked against its count."""
    from .spawned import spawned

    records = 0
    with spawned([work, str(n), str(threads)]) as (proc, printed):
        proc.ring_capacity = capacity
        probe = proc.probe(spec, action="record")
        code = None
        while proc.alive:
            code = proc.run(timeout=RECORD_TICK if drain_during else None)
            records += len(proc.records())
        records += len(proc.records())
        lost = proc.lost_records
        drain = proc.engine.optimizer.ring.stats
        calls, own, ns = _parse(printed())
    if code != 0 or probe.hits != own or records + lost != own or own != calls:
        raise RuntimeError(f"{spec}: exit {code}, {probe.hits} hits, {records} records + {lost} lost, "
                           f"workload ran {own} of {calls}")
    rates = tuple(drain[n] / max(drain[t], 1) * 1e9 for n, t in (("drained", "drain_ns"), ("decoded", "decode_ns")))
    return ns, records, probe.mode, lost, rates


def bpftrace_count(work: str, n: int, threads: int) -> tuple[float, int] | str:
    if shutil.which("bpftrace") is None:
        return "bpftrace is not installed"
    if os.geteuid() != 0:
        return "bpftrace needs root"
    r = subprocess.run(["bpftrace", "-e", f"uprobe:{work}:hit {{ @c = count(); }}", "-c",
                        f"{work} {n} {threads}"], capture_output=True, text=True, timeout=600)
    m = re.search(r"^@c: (\d+)", r.stdout, re.M)
    if r.returncode != 0 or m is None:
        return f"bpftrace failed: {(r.stderr or r.stdout)[-300:]}"
    calls, own, ns = _parse(r.stdout)
    if int(m[1]) != own:
        return f"bpftrace counted {m[1]}, workload ran {own}"
    return ns, int(m[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.optimized")
    ap.add_argument("--calls", type=int, default=2_000_000, help="calls per thread (fast rows)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    work = str(build().work)
    n, t, slow = args.calls, args.threads, max(args.calls // SLOW, 1000)

    def median(f, *a):
        samples = [f(*a) for _ in range(args.repeats)]
        return samples, statistics.median(s[0] for s in samples)

    _, base = median(unprobed, work, n, t)
    _, base_slow = median(unprobed, work, slow, t)
    rows = [("unprobed", "", f"{base:.1f}", "", "")]
    for label, spec, action, calls, floor in (
            ("pyprobes count, optimized (nop5 at hit)", "hit", "count", n, base),
            (f"pyprobes count, optimized (lea at hit+{LEA_OFF})", f"hit+{LEA_OFF}", "count", n, base),
            (f"pyprobes count, boosted (push at hit+{PUSH_OFF})", f"hit+{PUSH_OFF}", None, slow, base_slow)):
        samples, ns = median(pyprobes_count, work, calls, t, spec, action)
        rows.append((label, samples[0][2], f"{ns:.1f}", f"{ns - floor:.1f}", f"{samples[0][1]:,}"))
    for ring, drain_during in ((BIG_RING, True), (BIG_RING, False), (RECORD_RING, True)):
        samples, ns = median(pyprobes_record, work, n, t, "hit", ring, drain_during)
        _, records, mode, lost, rate = samples[0]
        copy = statistics.median(s[4][0] for s in samples) / 1e6
        decode = statistics.median(s[4][1] for s in samples) / 1e6
        when = "drained every 5 ms" if drain_during else "drained after the run"
        rows.append((f"pyprobes record, optimized (nop5 at hit; ring {ring:,}: {lost:,} lost; consumer: "
                     f"{copy:.1f} M records/s out of the ring, {decode:.2f} M/s decoded, {when})", mode,
                     f"{ns:.1f}", f"{ns - base:.1f}", f"{records + lost:,}"))
    got = bpftrace_count(work, slow, t)
    kernel = None
    if isinstance(got, str):
        rows.append(("bpftrace count() on hit (nop5)", "", "", got, ""))
    else:
        samples, ns = median(bpftrace_count, work, slow, t)
        kernel = ns - base_slow
        rows.append(("bpftrace count() on hit (nop5)", "uprobe", f"{ns:.1f}", f"{kernel:.1f}",
                     f"{samples[0][1]:,}"))
    print(f"bench/work.c, {t} thread(s), {n:,} calls per thread ({slow:,} for the slow rows), "
          f"median of {args.repeats}")
    print("| row | mode | ns/call | per hit, ns | hits (= workload's own) | per hit × bpftrace's |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        ratio = f"{float(row[3]) / kernel:.3f}" if kernel and row[3] else ""
        print("| " + " | ".join((*row, ratio)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
