"""Helpers for the engine tests: real fixture processes under pyprobes, their output, cleanup.

Every process a test starts is registered with the `procs` fixture, which SIGKILLs and reaps
whatever is left at teardown (traced or detached), even when the test failed. A watchdog
thread SIGKILLs them too if a test runs longer than WATCHDOG seconds, so a hung tracee
turns into a failure instead of a hung suite (the tracer's waitpid returns on the kill).
A SIGALRM guard cannot serve: Process.run(timeout=...) uses SIGALRM itself.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

import pyprobes
from conftest import watchdog
from pyprobes.symbols import ElfFile

WATCHDOG = 120.0  # seconds; a test reaching it has hung, not run slowly (even on a loaded machine)


def parse_output(text: str) -> dict[tuple[str, ...], dict[str, int]]:
    """Lines of words and "name number" pairs, keyed by the words before the first pair:
    "func lea calls 80000 bad 0" -> {("func", "lea"): {"calls": 80000, "bad": 0}};
    "sigtrap 0" -> {(): {"sigtrap": 0}} (pairs of lines without key words merge under ()).
    """
    number = re.compile(r"-?(0x[0-9a-fA-F]+|[0-9]+)")
    table: dict[tuple[str, ...], dict[str, int]] = {}
    for line in text.splitlines():
        words = line.split()
        i = 0
        while i + 1 < len(words) and not number.fullmatch(words[i + 1]):
            i += 1
        key = tuple(words[:i])
        values = table.setdefault(key, {})
        while i + 1 < len(words) and number.fullmatch(words[i + 1]):
            values[words[i]] = int(words[i + 1], 0)
            i += 2
    return table


class Run:
    """One spawned fixture: its Process and the file its stdout goes to."""

    def __init__(self, proc: pyprobes.Process, out: Path, exe: Path) -> None:
        self.proc = proc
        self.out = out
        self.exe = exe

    @property
    def text(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def results(self):
        return parse_output(self.text)

    def run_until(self, pattern: str, seconds: float = 20.0, step: float = 0.02) -> re.Match:
        """proc.run() in short slices until stdout matches PATTERN (a regex, multiline)."""
        deadline = time.monotonic() + seconds
        while True:
            m = re.search(pattern, self.text, re.M)
            if m:
                return m
            if not self.proc.alive:
                raise AssertionError(f"process exited ({self.proc.exit_code}) before {pattern!r}; "
                                     f"output: {self.text!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen after {seconds} s; output: {self.text!r}")
            self.proc.run(timeout=step)

    def finish(self) -> int | None:
        """Run to exit (again after any stop() from a handler); the exit code."""
        while self.proc.alive:
            self.proc.run()
        return self.proc.exit_code


class Procs:
    """Everything a test starts; all of it is killed and reaped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.runs: list[Run] = []
        self.pids: list[int] = []     # our children, traced or detached

    def spawn(self, exe: Path, *args) -> Run:
        out = self.tmp / f"out-{len(self.runs)}.txt"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        saved = os.dup(1)
        try:
            os.dup2(fd, 1)
            try:
                proc = pyprobes.spawn([str(exe), *map(str, args)])
            finally:
                os.dup2(saved, 1)
        finally:
            os.close(saved)
            os.close(fd)
        self.pids.append(proc.pid)
        run = Run(proc, out, exe)
        self.runs.append(run)
        return run

    def kill_all(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        for run in self.runs:
            proc = run.proc
            try:
                if proc.tracee.attached and proc.alive:
                    proc.kill()
            except Exception:
                pass
        self.kill_all()
        for pid in self.pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


@pytest.fixture
def procs(tmp_path, request):
    p = Procs(tmp_path)
    with watchdog(p, request, WATCHDOG):
        yield p


def labels(path: Path) -> dict[str, int]:
    """Every named symbol of the ELF file (functions and plain asm labels): link-time addresses."""
    from elftools.elf.elffile import ELFFile

    found: dict[str, int] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        for sym in symtab.iter_symbols():
            if sym.name and sym["st_shndx"] != "SHN_UNDEF" and sym["st_info"]["type"] in ("STT_FUNC", "STT_NOTYPE"):
                found.setdefault(sym.name, sym["st_value"])
    return found


def spec_of(path: Path, function: str, label: str) -> str:
    """'function+0xOFF' for an asm label inside FUNCTION (probes are placed relative to a symbol)."""
    table = labels(path)
    return f"{function}+{table[label] - table[function]:#x}"


def function_bytes(path: Path, name: str) -> tuple[int, bytes]:
    """(link address, the file's bytes) of function NAME."""
    elf = ElfFile.load(path)
    (sym,) = elf.lookup(name)
    return sym.address, elf.read_vaddr(sym.address, sym.size)


def load_bias(pid: int, path: Path) -> int:
    """Runtime address minus link address of the main executable PATH in process PID."""
    from pyprobes.symbols import modules

    real = os.path.realpath(path)
    for mod in modules(pid):
        if os.path.realpath(mod.path) == real:
            return mod.to_runtime(0)
    raise AssertionError(f"{path} is not mapped in {pid}")


def read_mem(pid: int, address: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(address)
        return f.read(size)


def maps(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, perms, name) of every mapping of PID."""
    rows = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            rows.append((start, end, fields[1], fields[5] if len(fields) > 5 else ""))
    return rows


def hold_in_boosted_slot(run, spec):
    """Probe SPEC with a pre-handler that, at the first boosted hit, holds the hitting thread:
    the hit path then sets its RIP to the slot and "resumes" it, which a held thread ignores,
    so it stays stopped at the slot's first byte. Returns (probe, {"tid", "rdi"})."""
    proc = run.proc
    held: dict[str, int] = {}

    def pre(tid, regs):
        if p.mode == "boosted" and not held:
            proc.tracee.hold(tid)
            held["tid"] = tid
            held["rdi"] = regs.rdi
            proc.stop()

    p = proc.probe(spec, pre=pre)
    run.run_until(r"^ready")
    for _ in range(50):
        if held:
            break
        proc.run(timeout=0.2)
    assert held, "no boosted hit seen"
    return p, held
