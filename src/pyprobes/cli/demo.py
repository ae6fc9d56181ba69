"""`pyprobes demo`: count probes on a small program shipped with pyprobes, compiled on first use."""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from . import count
from .output import CliError, note

SOURCE = Path(__file__).resolve().parent.parent / "demo" / "demo.c"
ROUNDS = 5000
# The demo's C counters are longs, but a round costs tens of µs traced: this many take minutes.
MAX_ROUNDS = 10_000_000
THREADS = 2
PROBES = ("demo_work", "demo_add", "demo_tick")

HELP = "count probes on a built-in demo program (compiled with gcc on first use)"
EPILOG = """\
The demo program (shipped as pyprobes/demo/demo.c) runs 2 threads that call demo_work,
demo_add and demo_tick a known number of times and prints its own counts. pyprobes counts
the same calls twice. First with breakpoints only (count --no-optimize): three probes, one
of each kind: boosted (demo_add: one stop per hit), emulated (demo_work starts with a nop,
padding gcc leaves for patching: one stop, no slot) and stepped (demo_tick starts with a
lock-prefixed add: two stops per hit). Then as `pyprobes count` does by default: demo_add
and demo_work jump-optimised (mode optimized: counted inside the process, no stop), and
demo_tick still stepped, as `pyprobes list` says (a lock-prefixed add cannot be moved).

examples:
  pyprobes demo
  pyprobes demo --rounds 100000 --json
"""


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help=HELP, usage='%(prog)s [--rounds N] [--json] [-o FILE]', description=HELP.capitalize() + ".", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"loop rounds per thread (default {ROUNDS})")
    p.add_argument("--json", action="store_true", help="the count report as JSON")
    p.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stderr")
    p.set_defaults(func=run)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyprobes"


def build() -> Path:
    """The demo binary, compiled once per source text into ~/.cache/pyprobes."""
    try:
        text = SOURCE.read_bytes()
    except OSError as e:
        raise CliError(f"the demo source is missing from this installation ({SOURCE}: {e.strerror})", 1)
    key = hashlib.sha256(text).hexdigest()[:12]
    exe = cache_dir() / f"demo.{key}" / "pyprobes-demo"
    if exe.exists():
        return exe
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise CliError("the demo needs a C compiler: gcc was not found (install gcc, e.g. apt install gcc)", 1)
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(exe.name + f".{os.getpid()}.tmp")
    cmd = [gcc, "-g", "-O1", "-pthread", "-o", str(tmp), str(SOURCE)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["no message"])[0]
        raise CliError(f"compiling the demo failed: {first}", 1)
    os.replace(tmp, exe)
    return exe


def _count(exe: Path, args, optimize: bool) -> tuple[int, dict[str, int]]:
    ns = argparse.Namespace(pid=None, duration=None, interval=None, json=args.json, output=args.output,
                            verbose=True, same_cpu=False, busy_wait=None, probes=list(PROBES),
                            optimize=optimize)
    captured: dict[str, int] = {}
    status = count.run(ns, [str(exe), str(args.rounds)], on_done=captured.update)
    return status, captured


def run(args, command: list[str]) -> int:
    if command:
        raise CliError("demo takes no command", 2)
    if not 0 < args.rounds <= MAX_ROUNDS:
        raise CliError(f"--rounds must be between 1 and {MAX_ROUNDS:,}", 2)
    exe = build()
    work = THREADS * args.rounds
    expected = {"demo_work": work, "demo_add": 2 * work, "demo_tick": THREADS * ((args.rounds + 9) // 10)}
    runs = ((False, "with breakpoints only (count --no-optimize)",
             "Each hit stopped the thread at an int3, ran the displaced instruction boosted, emulated "
             "or stepped, and let it go on."),
            (True, "as count does by default, jump-optimised where it can",
             "An optimized probe counted each hit inside the process, in a trampoline its jmp leads "
             "to, with no stop; the others stayed breakpoints."))
    status = 0
    for optimize, how, what in runs:
        note(f"demo: counting {', '.join(PROBES)} in {exe} ({THREADS} threads x {args.rounds} rounds) {how}")
        done, captured = _count(exe, args, optimize)
        got = ", ".join(f"{k} {captured.get(k)}" for k in PROBES)
        if done == 0 and all(captured.get(k) == v for k, v in expected.items()):
            note(f"demo: the probes counted {got}: exactly the program's own counts (its line on "
                 f"stdout). {what}")
        else:
            note(f"demo: the probes counted {got}; the program's own counts should be "
                 + ", ".join(f"{k} {v}" for k, v in expected.items()))
            done = done or 1
        status = status or done
    return status
