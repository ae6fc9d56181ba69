"""Loops that hunt the detach race (a SIGTRAP of ours still pending when a thread is detached).

    python tools/detach_storm.py api [ROUNDS] [THREADS]
        attach -> probe (stepped: `lock add`) -> run(timeout=0.03) -> detach, ROUNDS times
        (default 3000) on one process whose THREADS threads (default 8) call the probed
        function back to back; the process must be alive after every round.
    python tools/detach_storm.py storm [RUNS] [LOAD]
        the suite's detach-in-a-breakpoint-storm test RUNS times (default 200), each in its own
        pytest, while LOAD busy processes (default 2, one per core here) load the machine.

Each prints one line per failure and a closing "N passed, N failed" line; exit status 1 if any failed.
Not a test: it takes minutes, and a race found once in thousands of rounds is its point.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STORM_TEST = "tests/tracee/test_breakpoint_hits.py::test_detach_in_the_middle_of_a_breakpoint_storm"


def _build_paced() -> Path:
    sys.path.insert(0, str(ROOT))
    from bench.build import compile_cached

    source = (ROOT / "tests" / "fixtures" / "eng_paced.c").read_bytes()
    return compile_cached("eng_paced", source, ["-O2", "-pthread"])


def api_loop(rounds: int, threads: int) -> int:
    import pyprobes

    exe = _build_paced()
    # paced_hit starts with `lock add`: stepped, two stops per hit, the widest window.
    child = subprocess.Popen([str(exe), str(threads), str(10**12), "0"], stdout=subprocess.DEVNULL)
    passed = failed = 0
    try:
        time.sleep(0.2)
        for i in range(rounds):
            proc = pyprobes.attach(child.pid)
            try:
                probe = proc.probe("paced_hit")
                proc.run(timeout=0.03)
                mode = probe.mode
            finally:
                proc.detach()
            if child.poll() is not None:
                failed += 1
                print(f"round {i}: the process died after detach, status {child.returncode} (mode {mode})")
                break
            passed += 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def storm(runs: int, load: int) -> int:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    passed = failed = 0
    try:
        for i in range(runs):
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", STORM_TEST],
                               cwd=ROOT, capture_output=True, text=True)
            if r.returncode == 0:
                passed += 1
            else:
                failed += 1
                tail = "\n".join(r.stdout.splitlines()[-15:])
                print(f"run {i}: failed\n{tail}")
    finally:
        for hog in hogs:
            hog.send_signal(signal.SIGKILL)
            hog.wait()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("api", "storm"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    numbers = [int(a) for a in argv[1:]]
    if argv[0] == "api":
        return api_loop(*(numbers + [3000, 8][len(numbers):]))
    return storm(*(numbers + [200, 2][len(numbers):]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
