"""Fixture processes for the engine and return-probe tests: spawned under pyprobes or started
plainly to attach to, their stdout in a file, an optional stdin pipe, and cleanup.

Every process a test starts is registered with the `procs` fixture (tests/conftest.py), which
SIGKILLs and reaps whatever is left at teardown, traced or not, even when the test failed.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyprobes


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

    @property
    def results(self) -> dict[tuple[str, ...], dict[str, int]]:
        return parse_output(self.text)

    def finish(self) -> int | None:
        """Run to exit (again after any stop() from a handler); the exit code."""
        while self.proc.alive:
            self.proc.run()
        return self.proc.exit_code

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
        self.pids: list[int] = []     # other children a test started itself, killed and reaped too

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
        for pid in [run.pid for run in self.runs] + self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
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
        for pid in self.pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


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
