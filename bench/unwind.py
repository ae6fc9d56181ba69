"""The cost of a stack: python -m bench.unwind [--hits N]

Spawns tests/fixtures/stk_chain.c (-O2 -fomit-frame-pointer, main -> stk_a -> stk_b -> stk_c)
and probes stk_c three ways: a pre-handler that does nothing (a hit without a stack), one that
unwinds the stack (Process.stack), and the unwind alone timed inside the handler. Per frame is
the unwind divided by the frames it found. The deep row does the same in Debian's stripped
python3.11 (libc:getpid, ~16 frames) when it is installed. The first unwind of a process
(modules read, each module's .eh_frame parsed) is the "cold" column.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyprobes

REPO = Path(__file__).resolve().parent.parent
CHAIN = REPO / "tests" / "fixtures" / "stk_chain.c"
PYTHON = "/usr/bin/python3.11"


def _run(argv: list[str], spec: str, mode: str) -> tuple[float, list[float], int, float]:
    """(wall seconds, per-unwind seconds, frames per stack, first unwind seconds)."""
    proc = pyprobes.spawn(argv)
    unwinds: list[float] = []
    depth = [0]

    def nothing(tid, regs):
        pass

    def unwind(tid, regs):
        t = time.perf_counter()
        frames = proc.stack(tid, regs)
        unwinds.append(time.perf_counter() - t)
        depth[0] = len(frames)

    try:
        proc.run_to_entry()
        proc.probe(spec, pre=nothing if mode == "none" else unwind)
        start = time.perf_counter()
        proc.run()
        wall = time.perf_counter() - start
    finally:
        if proc.alive:
            proc.kill()
    first = unwinds[0] if unwinds else 0.0
    return wall, unwinds[1:], depth[0], first


def _row(label: str, argv: list[str], spec: str, hits: int) -> None:
    wall_none, _, _, _ = _run(argv, spec, "none")
    wall_stack, unwinds, depth, first = _run(argv, spec, "stack")
    med = statistics.median(unwinds)
    print(f"| {label} | {depth} | {wall_none / hits * 1e6:.1f} | {wall_stack / hits * 1e6:.1f} | "
          f"{med * 1e6:.1f} | {min(unwinds) * 1e6:.1f} | {med / depth * 1e6:.2f} | {first * 1e3:.1f} |",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.unwind", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hits", type=int, default=2000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "stk_chain")
        subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-o", exe, str(CHAIN)], check=True)
        print(f"{args.hits} hits per run\n")
        print("| program (probe) | frames | hit without stack, us | hit with stack, us | unwind median, us "
              "| unwind min, us | per frame, us | first unwind (cold), ms |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        _row("stk_chain -O2 (stk_c)", [exe, str(args.hits)], "stk_c", args.hits)
        if os.path.exists(PYTHON):
            with open(os.path.join(tmp, "calls.py"), "w") as f:
                f.write(f"import os\ndef leaf():\n    return os.getpid()\nfor _ in range({args.hits}):\n    leaf()\n")
            _row("python3.11 (libc:getpid)", [PYTHON, os.path.join(tmp, "calls.py")], "libc:getpid", args.hits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
