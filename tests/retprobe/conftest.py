"""Helpers for the return-probe tests: fixture processes (spawned traced, or started plainly to
attach to), their stdout in a file, an optional stdin pipe, and cleanup.

Every process a test starts is SIGKILLed and reaped at teardown, traced or not. A watchdog
thread SIGKILLs them too if a test runs longer than WATCHDOG seconds, so a hung tracee turns
into a failure instead of a hung suite (a SIGALRM guard cannot serve: Process.run(timeout=...)
uses SIGALRM itself).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import pyprobes
from conftest import watchdog

WATCHDOG = 60.0  # seconds; a test reaching it has hung, not run slowly


class Run:
    """One fixture process: its pyprobes Process (None until attached), stdout file, stdin pipe."""

    def __init__(self, pid: int, out: Path, exe: Path, stdin: int | None,
                 proc: pyprobes.Process | None = None, popen: subprocess.Popen | None = None) -> None:
        self.pid = pid
        self.out = out
        self.exe = exe
        self.stdin = stdin   # write end of the fixture's stdin, or None
        self.proc = proc
        self.popen = popen

    @property
    def text(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.text.splitlines() if line.startswith(prefix)]

    def write(self, data: bytes) -> None:
        assert self.stdin is not None
        os.write(self.stdin, data)

    def close_stdin(self) -> None:
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None

    def wait_output(self, pattern: str, seconds: float = 20.0) -> re.Match:
        """Wait (without tracing) until stdout matches PATTERN."""
        deadline = time.monotonic() + seconds
        while True:
            m = re.search(pattern, self.text, re.M)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen after {seconds} s; output: {self.text!r}")
            time.sleep(0.005)

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

    def wait_exit(self, seconds: float = 20.0) -> int:
        """Reap an untraced (detached, or never traced) fixture: its exit code (-signal if killed)."""
        deadline = time.monotonic() + seconds
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                if self.popen is not None:
                    self.popen.returncode = 0  # reaped here; keep Popen from waiting again
                return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
            if time.monotonic() > deadline:
                raise AssertionError(f"PID {self.pid} still running after {seconds} s; output: {self.text!r}")
            time.sleep(0.005)


class Procs:
    """Everything a test starts; all of it is killed and reaped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.runs: list[Run] = []

    def _files(self, stdin_pipe: bool) -> tuple[Path, int, int | None, int | None]:
        out = self.tmp / f"out-{len(self.runs)}.txt"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        r = w = None
        if stdin_pipe:
            r, w = os.pipe()
        return out, fd, r, w

    def spawn(self, exe: Path, *args, stdin_pipe: bool = False) -> Run:
        """The fixture started under pyprobes (stopped at its exec)."""
        out, fd, r, w = self._files(stdin_pipe)
        saved_out = os.dup(1)
        saved_in = os.dup(0) if r is not None else None
        try:
            os.dup2(fd, 1)
            if r is not None:
                os.dup2(r, 0)
            try:
                proc = pyprobes.spawn([str(exe), *map(str, args)])
            finally:
                os.dup2(saved_out, 1)
                if saved_in is not None:
                    os.dup2(saved_in, 0)
        finally:
            os.close(saved_out)
            if saved_in is not None:
                os.close(saved_in)
            os.close(fd)
            if r is not None:
                os.close(r)
        run = Run(proc.pid, out, exe, w, proc=proc)
        self.runs.append(run)
        return run

    def start(self, exe: Path, *args, stdin_pipe: bool = True) -> Run:
        """The fixture started plainly (to attach to later)."""
        out, fd, r, w = self._files(stdin_pipe)
        try:
            popen = subprocess.Popen([str(exe), *map(str, args)], stdout=fd,
                                     stdin=r if r is not None else subprocess.DEVNULL)
        finally:
            os.close(fd)
            if r is not None:
                os.close(r)
        run = Run(popen.pid, out, exe, w, popen=popen)
        self.runs.append(run)
        return run

    def attach(self, run: Run) -> pyprobes.Process:
        run.proc = pyprobes.attach(run.pid)
        return run.proc

    def kill_all(self) -> None:
        for run in self.runs:
            try:
                os.kill(run.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        for run in self.runs:
            proc = run.proc
            try:
                if proc is not None and proc.tracee.attached and proc.alive:
                    proc.kill()
            except Exception:
                pass
        self.kill_all()
        for run in self.runs:
            try:
                os.waitpid(run.pid, 0)
            except ChildProcessError:
                pass
            if run.popen is not None:
                run.popen.returncode = -9
            run.close_stdin()


@pytest.fixture
def procs(tmp_path, request):
    p = Procs(tmp_path)
    with watchdog(p, request, WATCHDOG):
        yield p


def maps(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, perms, name) of every mapping of PID."""
    rows = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            rows.append((start, end, fields[1], fields[5] if len(fields) > 5 else ""))
    return rows


def read_mem(pid: int, address: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(address)
        return f.read(size)


def text_differences(pid: int, exe: Path) -> list[str]:
    """Where PID's mapped executable segments of EXE differ from the file (empty: identical)."""
    from pyprobes.symbols import ElfFile, modules

    real = os.path.realpath(exe)
    (mod,) = [m for m in modules(pid) if os.path.realpath(m.path) == real]
    elf = ElfFile.load(exe)
    diffs = []
    for seg in elf.segments:
        if not seg.flags & 1:  # PF_X
            continue
        want = elf.read_vaddr(seg.vaddr, seg.filesz)
        got = read_mem(pid, mod.to_runtime(seg.vaddr), seg.filesz)
        if got != want:
            at = next(i for i in range(len(want)) if got[i] != want[i])
            diffs.append(f"segment {seg.vaddr:#x}: first difference at +{at:#x}")
    return diffs
