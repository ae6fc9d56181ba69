"""Loops that torture jump-optimised probes (issue 11, "Must show"), on tests/fixtures/opt_torture.c.

    python tools/optimize_torture.py churn [ROUNDS] [THREADS]
        One process whose THREADS threads (default 8) call tort_lea and tort_push back to back;
        ROUNDS times (default 10000) one of: probe(action="count") on either function, run a
        moment (optimised as run() starts), remove() (unpatched under a freeze, its trampoline
        garbage); or disable() and enable() a standing count probe on tort_push. Every 16th
        round a SIGUSR1 goes to a worker (it may be in a trampoline). Checked: the process
        lives through every round, each probe is optimised and counts no more than the calls,
        trampoline pages stay bounded and collections happen (Process.trampolines.stats()), and
        at the end the program's own results are right (every return value, no SIGTRAP, every
        SIGUSR1 handled once and none in a trampoline).
    python tools/optimize_torture.py counts [CALLS] [THREADS] [RUNS]
        RUNS times (default 3), THREADS threads (default 8) x CALLS calls (default 1,000,000)
        of both functions, both probed with action="count" before the first call: the hits
        must equal the calls exactly. Prints the wall time of each run.

Each prints one line per failure and a closing "N passed, N failed" line; exit status 1 if any
failed. Not a test: it takes minutes (tests/engine/test_optimized_torture.py has the short forms).
"""
from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FUNCTIONS = ("tort_lea", "tort_push")
MAX_PAGES = 2  # one page serves both trampolines; a second may appear while garbage waits


def _build() -> Path:
    sys.path.insert(0, str(ROOT))
    from bench.build import compile_cached

    source = (ROOT / "tests" / "fixtures" / "opt_torture.c").read_bytes()
    return compile_cached("opt_torture", source, ["-O1", "-pthread"])


@contextmanager
def _stdio(stdin: int, stdout: int) -> Iterator[None]:
    """Our fds 0 and 1 replaced by STDIN and STDOUT while the child is spawned (it inherits them)."""
    saved = os.dup(0), os.dup(1)
    try:
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        yield
    finally:
        os.dup2(saved[0], 0)
        os.dup2(saved[1], 1)
        os.close(saved[0])
        os.close(saved[1])


def _spawn(threads: int, calls: int):
    """pyprobes.spawn of opt_torture THREADS CALLS: (proc, write end of its stdin, read end of its stdout)."""
    import pyprobes

    exe = _build()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        with _stdio(in_r, out_w):
            proc = pyprobes.spawn([str(exe), str(threads), str(calls)])
    finally:
        os.close(in_r)
        os.close(out_w)
    return proc, in_w, out_r


def _results(out_r: int) -> dict[str, dict[str, int]]:
    """The fixture's closing lines by first word: "calls lea L push P bad B" -> {"calls": {"lea": L,
    "push": P, "bad": B}}, "sigtrap S" -> {"sigtrap": {"sigtrap": S}}."""
    data = b""
    while chunk := os.read(out_r, 65536):
        data += chunk
    os.close(out_r)
    found: dict[str, dict[str, int]] = {}
    for line in data.decode(errors="replace").splitlines():
        words = line.split()
        if words:
            found[words[0]] = {k: int(v) for k, v in re.findall(r"(\w+) (-?\d+)", line)}
    return found


def _run_to_exit(proc) -> int | None:
    while proc.alive:
        proc.run()
    return proc.exit_code


def churn(rounds: int, threads: int) -> int:
    from pyprobes.tracee import ptrace

    proc, stdin, out_r = _spawn(threads, 0)
    passed = failed = 0
    rng = random.Random(11)

    def fail(text: str) -> None:
        nonlocal failed
        failed += 1
        print(text, flush=True)

    steady = proc.probe("tort_push", action="count")
    lea_hits = push_hits = sent = pages = retried = 0
    start = time.monotonic()
    try:
        proc.run(timeout=0.05)
        for i in range(rounds):
            if not proc.alive:
                fail(f"round {i}: the process is gone (exit {proc.exit_code})")
                break
            if i % 16 == 5:
                workers = [tid for tid in proc.tracee.threads if tid != proc.pid]
                if workers:
                    ptrace.tgkill(proc.pid, rng.choice(workers), signal.SIGUSR1)
                    sent += 1
            if i % 4 == 3:  # the standing probe: disabled (unoptimised), enabled (queued again)
                steady.disable()
                proc.run(timeout=0.001)
                steady.enable()
                proc.run(timeout=0.002)
                probe, name = steady, "tort_push (standing)"
            else:
                name = FUNCTIONS[i % 2]
                probe = proc.probe(name, action="count")
                proc.run(timeout=0.002)
            mode, why = probe.mode, probe.point.not_optimized
            if mode != "optimized":
                # A thread in the region or a stack word pointing into it: optimised at a later run().
                proc.run(timeout=0.002)
                retried += 1
                mode = probe.mode
            if probe is not steady:
                probe.remove()
                if name == "tort_lea":
                    lea_hits += probe.hits
                else:
                    push_hits = max(push_hits, probe.hits)
            pages = max(pages, proc.trampolines.stats()["pages"])
            if mode != "optimized":
                fail(f"round {i}: {name} is {mode}, not optimized ({why})")
            elif pages > MAX_PAGES:
                fail(f"round {i}: {pages} trampoline pages")
            else:
                passed += 1
        stats = proc.trampolines.stats()
        optimizer = dict(proc.engine.optimizer.stats)
        os.close(stdin)
        stdin = -1
        code = _run_to_exit(proc)
    finally:
        if stdin >= 0:
            os.close(stdin)
        if proc.alive:
            proc.kill()
    took = time.monotonic() - start
    out = _results(out_r)
    calls, usr1, trap = out.get("calls", {}), out.get("usr1", {}), out.get("sigtrap", {})
    print(f"{rounds} rounds with {threads} threads in {took:.1f} s; trampolines {stats}; "
          f"optimizer {optimizer}; retried {retried}; exit {code}; calls {calls}; usr1 {usr1} "
          f"(sent {sent})", flush=True)
    checks = {
        "the program exits 0": code == 0,
        "every return value right": calls.get("bad") == 0,
        "no SIGTRAP reached the program": trap.get("sigtrap") == 0,
        "no signal frame in a trampoline": usr1.get("outside") == 0,
        "every SIGUSR1 handled once": usr1.get("got") == sent,
        "lea hits <= calls": 0 < lea_hits <= calls.get("lea", 0),
        "push hits <= calls": 0 < steady.hits <= calls.get("push", 0) and push_hits <= calls.get("push", 0),
        f"pages <= {MAX_PAGES}": pages <= MAX_PAGES,
        "collections happened": stats["collections"] >= (rounds * 3 // 4) // (proc.trampolines.slots_per_page + 1),
        "garbage bounded": stats["garbage"] <= proc.trampolines.slots_per_page,
    }
    for what, ok in checks.items():
        if ok:
            passed += 1
        else:
            fail(f"end: not so: {what}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def counts(calls: int, threads: int, runs: int) -> int:
    passed = failed = 0
    for run in range(runs):
        proc, stdin, out_r = _spawn(threads, calls)
        os.close(stdin)
        probes = [proc.probe(name, action="count") for name in FUNCTIONS]
        start = time.monotonic()
        code = _run_to_exit(proc)
        took = time.monotonic() - start
        out = _results(out_r)
        want = calls * threads
        got = [p.hits for p in probes]
        modes = [p.mode for p in probes]
        ok = (code == 0 and out.get("calls") == {"lea": want, "push": want, "bad": 0}
              and got == [want, want] and modes == ["optimized", "optimized"])
        print(f"run {run}: {threads} threads x {calls} calls: hits {got} of {want} each, modes {modes}, "
              f"exit {code}, {took:.2f} s", flush=True)
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"run {run}: failed: {out}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("churn", "counts"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    numbers = [int(a) for a in argv[1:]]
    if argv[0] == "churn":
        return churn(*(numbers + [10_000, 8][len(numbers):]))
    return counts(*(numbers + [1_000_000, 8, 3][len(numbers):]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
