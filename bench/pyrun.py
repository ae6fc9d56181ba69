"""One pyprobes measurement in a fresh interpreter (python -m bench.pyrun), run by `python -m bench`.

    python -m bench.pyrun SPEC [--no-boost] [--busy-wait US] [--profile N] -- PROGRAM [ARGS...]

Spawns PROGRAM under pyprobes with one probe at SPEC, runs it to the end, and prints
"pyprobes: hits=H mode=M exit=E user_ns_per_hit=U sys_ns_per_hit=S polls=C/T/K" on stderr (U and
S: this tracer's own CPU time during proc.run(), per hit; C/T/K: busy-wait polls that caught a
stop, timed out, and waits that skipped the poll while backing off). PROGRAM's own output goes to the inherited stdout.
With --profile N, proc.run() runs under cProfile and the top N functions (by own time) follow on
stderr.
"""
from __future__ import annotations

import argparse
import resource
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m bench.pyrun SPEC [--no-boost] [--busy-wait US] [--profile N] -- PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    split = argv.index("--")
    command = argv[split + 1:]
    ap = argparse.ArgumentParser(prog="python -m bench.pyrun")
    ap.add_argument("spec")
    ap.add_argument("--no-boost", action="store_true", help="force the stepped path (boost=False)")
    ap.add_argument("--busy-wait", type=float, metavar="US", help="proc.busy_wait_us (default: pyprobes' own)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile run(); print top N")
    args = ap.parse_args(argv[:split])
    if not command:
        ap.error("no program given")

    import pyprobes

    profiler = None
    with pyprobes.spawn(command) as proc:
        probe = proc.probe(args.spec, boost=not args.no_boost)
        if args.busy_wait is not None:
            proc.busy_wait_us = args.busy_wait
        if args.profile:
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        before = resource.getrusage(resource.RUSAGE_SELF)
        code = proc.run()
        after = resource.getrusage(resource.RUSAGE_SELF)
        if profiler is not None:
            profiler.disable()
        hits, mode = probe.hits, probe.mode
        polls = getattr(proc.tracee, "poll_stats", None) or {}
    per = 1e9 / max(hits, 1)
    user, sys_ = (after.ru_utime - before.ru_utime) * per, (after.ru_stime - before.ru_stime) * per
    print(f"pyprobes: hits={hits} mode={mode} exit={code} user_ns_per_hit={user:.1f} sys_ns_per_hit={sys_:.1f} "
          f"polls={polls.get('caught', 0)}/{polls.get('timed_out', 0)}/{polls.get('skipped', 0)}",
          file=sys.stderr, flush=True)
    if profiler is not None:
        import pstats
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
