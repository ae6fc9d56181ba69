"""The rows of the benchmark: how each tool is run on the workload, and how its hits are counted.

Every runner returns one Sample: the workload's own ns per loop call (each call is one hit of the
probe), the workload's own count of hit's executions, and the count the tool reports.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .build import LEA_OFF, NOP_OFF, PUSH_OFF, Workload

REPO = Path(__file__).resolve().parent.parent
WORK_LINE = re.compile(r"calls=(\d+) hits=(\d+) sink=(-?\d+) ns_per_call=([0-9.]+)")
TRACEFS = Path("/sys/kernel/tracing")
EVENT_GROUP, EVENT_NAME = "pyprobes_bench", "pyprobes_bench_hit"


class RunError(RuntimeError):
    pass


@dataclass
class Sample:
    ns_per_call: float
    calls: int
    workload_hits: int
    tool_hits: int | None  # None: the row has no tool (the unprobed baseline)
    mode: str | None = None
    tracer_user_us: float | None = None  # the tracer's own CPU time per hit (pyprobes and C rows)
    tracer_sys_us: float | None = None


@dataclass
class Context:
    workload: Workload
    timeout: float
    python: str = sys.executable
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pyprobes-bench-")))


@dataclass
class Row:
    key: str
    tool: str
    mechanism: str
    stops: str                      # ptrace stops (or traps) per hit
    size: str                       # which N: "base", "ptrace", "slow", "kernel"
    run: Callable[[Context, int], Sample]
    floor: str | None = None        # the C floor row this one is compared to
    expect_mode: str | None = None  # pyprobes rows: the mode the probe must end in
    missing: Callable[[], str | None] = lambda: None  # why the row cannot run here, or None


# ---------------------------------------------------------------- helpers
def _run(cmd: list[str], ctx: Context, **kw) -> tuple[Sample, str]:
    """Run CMD (which runs the workload), parse the workload's line; the whole output is returned."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.timeout, cwd=REPO, **kw)
    except subprocess.TimeoutExpired:
        raise RunError(f"timed out after {ctx.timeout:.0f} s: {' '.join(cmd)}") from None
    out = r.stdout + r.stderr
    m = WORK_LINE.search(out)
    if r.returncode != 0 or m is None:
        tail = "\n".join(out.strip().splitlines()[-6:])
        raise RunError(f"exit {r.returncode}: {' '.join(cmd)}\n{tail}")
    calls, hits, _sink, ns = m.groups()
    return Sample(float(ns), int(calls), int(hits), None), out


def _count(pattern: str, text: str, what: str) -> int:
    m = re.search(pattern, text, re.M)
    if m is None:
        raise RunError(f"{what}: no hit count in its output")
    return int(m.group(1))


def _version(cmd: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(pattern, out, re.M)
    return m.group(1) if m else ""


def _need(program: str) -> Callable[[], str | None]:
    return lambda: None if shutil.which(program) else "not installed"


def _need_root_and(program: str | None = None) -> Callable[[], str | None]:
    def check() -> str | None:
        if program and not shutil.which(program):
            return "not installed"
        if os.geteuid() != 0:
            return "needs root"
        return None
    return check


# ---------------------------------------------------------------- rows
def run_baseline(ctx: Context, n: int) -> Sample:
    sample, _ = _run([str(ctx.workload.work), str(n)], ctx)
    sample.tool_hits = sample.workload_hits
    return sample


def pyprobes_runner(offset: int, boost: bool, busy_wait_us: float | None = None) -> Callable[[Context, int], Sample]:
    def run(ctx: Context, n: int) -> Sample:
        cmd = [ctx.python, "-m", "bench.pyrun", f"hit+{offset}"]
        if not boost:
            cmd.append("--no-boost")
        if busy_wait_us is not None:
            cmd += ["--busy-wait", str(busy_wait_us)]
        sample, out = _run([*cmd, "--", str(ctx.workload.work), str(n)], ctx)
        m = re.search(r"pyprobes: hits=(\d+) mode=(\w+) .*user_ns_per_hit=([0-9.]+) sys_ns_per_hit=([0-9.]+)", out)
        if m is None:
            raise RunError("pyprobes: no result line")
        sample.tool_hits, sample.mode = int(m.group(1)), m.group(2)
        sample.tracer_user_us, sample.tracer_sys_us = float(m.group(3)) / 1000, float(m.group(4)) / 1000
        return sample
    return run


def cfloor_runner(mode: str) -> Callable[[Context, int], Sample]:
    def run(ctx: Context, n: int) -> Sample:
        w = ctx.workload
        probe = w.hit + (NOP_OFF if mode.startswith("emulate") else LEA_OFF)
        cmd = [str(w.cfloor), mode, f"{probe:x}", f"{w.slot:x}", f"{w.first_load:x}", "--", str(w.work), str(n)]
        sample, out = _run(cmd, ctx)
        m = re.search(r"cfloor: mode=\w+ hits=(\d+) .*user_ns_per_hit=([0-9.]+) sys_ns_per_hit=([0-9.]+)", out)
        if m is None:
            raise RunError("cfloor: no result line")
        sample.tool_hits = int(m.group(1))
        sample.tracer_user_us, sample.tracer_sys_us = float(m.group(2)) / 1000, float(m.group(3)) / 1000
        return sample
    return run


def _tracefs_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not (TRACEFS / "uprobe_events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
    if not (TRACEFS / "uprobe_events").exists():
        return "no tracefs uprobe_events (kernel without CONFIG_UPROBE_EVENTS, or mount failed)"
    return None


def _tracefs_write(name: str, text: str, append: bool = False) -> None:
    # os.open, not open(..., "a"): Python seeks to the end of an appended file, which tracefs refuses.
    fd = os.open(TRACEFS / name, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def _tracefs_remove() -> None:
    enable = TRACEFS / "events" / EVENT_GROUP / EVENT_NAME / "enable"
    if enable.exists():
        _tracefs_write(f"events/{EVENT_GROUP}/{EVENT_NAME}/enable", "0")
        _tracefs_write("uprobe_events", f"-:{EVENT_GROUP}/{EVENT_NAME}", append=True)


def tracefs_runner(offset: int) -> Callable[[Context, int], Sample]:
    def run(ctx: Context, n: int) -> Sample:
        w = ctx.workload
        _tracefs_remove()  # a stale one from an interrupted run
        _tracefs_write("uprobe_events", f"p:{EVENT_GROUP}/{EVENT_NAME} {w.work}:{w.hit_file_offset + offset:#x}",
                       append=True)
        try:
            _tracefs_write(f"events/{EVENT_GROUP}/{EVENT_NAME}/enable", "1")
            sample, _ = _run([str(w.work), str(n)], ctx)
            _tracefs_write(f"events/{EVENT_GROUP}/{EVENT_NAME}/enable", "0")
            profile = (TRACEFS / "uprobe_profile").read_text()
        finally:
            _tracefs_remove()
        sample.tool_hits = _count(rf"^\s*{re.escape(str(w.work))}\s+{EVENT_NAME}\s+(\d+)", profile,
                                  "uprobe_profile")
        return sample
    return run


def run_bpftrace(ctx: Context, n: int) -> Sample:
    w = ctx.workload
    cmd = ["bpftrace", "-e", f"uprobe:{w.work}:hit {{ @c = count(); }}", "-c", f"{w.work} {n}"]
    sample, out = _run(cmd, ctx)
    sample.tool_hits = _count(r"^@c: (\d+)", out, "bpftrace")
    return sample


GDB_SCRIPT = f"""\
set pagination off
set confirm off
set debuginfod enabled off
break *(hit+{LEA_OFF})
commands
silent
continue
end
run
info breakpoints
"""


def run_gdb(ctx: Context, n: int) -> Sample:
    script = ctx.tmp / "hit.gdb"
    script.write_text(GDB_SCRIPT)
    w = ctx.workload
    sample, out = _run(["gdb", "-q", "-nx", "-batch", "-x", str(script), "--args", str(w.work), str(n)], ctx,
                       stdin=subprocess.DEVNULL)
    sample.tool_hits = _count(r"breakpoint already hit (\d+) time", out, "gdb")
    return sample


def run_ltrace(ctx: Context, n: int) -> Sample:
    summary = ctx.tmp / "ltrace.out"
    w = ctx.workload
    sample, _ = _run(["ltrace", "-L", "-x", "hit", "-c", "-o", str(summary), str(w.work), str(n)], ctx)
    sample.tool_hits = _count(r"^.*?\s(\d+)\s+hit\s*$", summary.read_text(), "ltrace")
    return sample


def rows() -> list[Row]:
    return [
        Row("baseline", "unprobed", "the workload alone (its own ns per call)", "0", "base", run_baseline),
        Row("py_emulated", "pyprobes", f"emulated 5-byte nop (hit+{NOP_OFF}): RIP += 5", "1", "ptrace",
            pyprobes_runner(NOP_OFF, True), floor="c_emulate", expect_mode="emulated"),
        Row("py_boosted", "pyprobes", f"boosted `lea` (hit+{LEA_OFF}): slot copy + jmp back", "1", "ptrace",
            pyprobes_runner(LEA_OFF, True), floor="c_boost", expect_mode="boosted"),
        Row("py_push", "pyprobes", f"boosted `push %rbx` (hit+{PUSH_OFF}): a push is cheaper boosted than emulated",
            "1", "ptrace", pyprobes_runner(PUSH_OFF, True), floor="c_boost", expect_mode="boosted"),
        Row("py_stepped", "pyprobes", f"stepped `lea` (hit+{LEA_OFF}, boost=False): single-step the copy",
            "2", "ptrace", pyprobes_runner(LEA_OFF, False), floor="c_step", expect_mode="stepped"),
        Row("py_boosted_nopoll", "pyprobes", f"boosted `lea` (hit+{LEA_OFF}), `busy_wait_us=0`: sleeps in waitpid",
            "1", "ptrace", pyprobes_runner(LEA_OFF, True, 0), floor="c_boost", expect_mode="boosted"),
        Row("c_emulate", "C ptrace floor", f"emulated 5-byte nop (hit+{NOP_OFF}): RIP = hit+5, CONT",
            "1", "ptrace", cfloor_runner("emulate")),
        Row("c_boost", "C ptrace floor", f"boosted `lea` (hit+{LEA_OFF}): RIP = slot, CONT", "1", "ptrace",
            cfloor_runner("boost")),
        Row("c_step", "C ptrace floor", f"stepped `lea` (hit+{LEA_OFF}): RIP = slot, SINGLESTEP, fix RIP",
            "2", "ptrace", cfloor_runner("step")),
        Row("c_boost_poll", "C ptrace floor, polling", f"boosted `lea` (hit+{LEA_OFF}), polls 25 µs before "
            "sleeping, as pyprobes does", "1", "ptrace", cfloor_runner("boost+poll")),
        Row("c_step_poll", "C ptrace floor, polling", f"stepped `lea` (hit+{LEA_OFF}), polls 25 µs before "
            "sleeping", "2", "ptrace", cfloor_runner("step+poll"), floor="c_step"),
        Row("k_nop5", "kernel uprobe (tracefs)", f"5-byte nop (hit+{NOP_OFF}): 6.18+ patches it into a call to a trampoline", "0–1 trap", "kernel",
            tracefs_runner(NOP_OFF), floor="c_boost", missing=_tracefs_missing),
        Row("k_push", "kernel uprobe (tracefs)", f"emulated `push %rbx` (hit+{PUSH_OFF})", "1 trap", "kernel",
            tracefs_runner(PUSH_OFF), floor="c_boost", missing=_tracefs_missing),
        Row("k_lea", "kernel uprobe (tracefs)", f"`lea` (hit+{LEA_OFF}): out-of-line single-step", "2 traps",
            "kernel", tracefs_runner(LEA_OFF), floor="c_boost", missing=_tracefs_missing),
        Row("bpftrace", ("bpftrace " + _version(["bpftrace", "--version"], r"v?([\d.]+)")).strip(),
            f"`uprobe:…:hit {{ @c = count(); }}`: the 5-byte nop at hit+{NOP_OFF}", "0–1 trap", "kernel",
            run_bpftrace, floor="c_boost", missing=_need_root_and("bpftrace")),
        Row("gdb", ("gdb " + _version(["gdb", "--version"], r"GNU gdb .*?([\d.]+)\s*$")).strip(),
            f"`break *(hit+{LEA_OFF})` + `commands; silent; continue; end`, batch", "≥2", "slow", run_gdb,
            floor="c_boost", missing=_need("gdb")),
        Row("ltrace", ("ltrace " + _version(["ltrace", "-V"], r"ltrace version ([\d.]*\d)")).strip(),
            f"`ltrace -L -x hit -c`: breakpoints at entry and return", "≥2", "slow", run_ltrace,
            floor="c_boost", missing=_need("ltrace")),
    ]
