"""The one process harness of every suite: fixture processes started under pyprobes, under the
bare tracee layer, or plainly (to attach to); their stdout read from a pipe without blocking; a
hang guard; and cleanup that SIGKILLs and reaps whatever a test left, traced or not, even when
the test failed.

The `procs` fixture (tests/conftest.py) hands a test one `Procs` under a `watchdog`:

    run = procs.spawn(exe, *args)          # pyprobes.spawn: run.proc, run.text, run.run_until(...)
    run = procs.start(exe, *args)          # plain child; procs.attach(run) or procs.attach_tracee(run)
    tracee, out = procs.spawn_tracee(argv) # pyprobes.tracee.Tracee.spawn, for the tracee layer's tests
"""
from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pyprobes
from pyprobes.symbols import ElfFile, modules
from pyprobes.tracee import Tracee, TraceeError

WALL = 0x40000000


class Output:
    """The read end of the pipe a fixture's stdout writes into; reads never block."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.data = b""
        self.eof = False

    def poll(self, timeout: float = 0.0) -> bool:
        """Read what is there (waiting up to TIMEOUT for something); True if anything came."""
        if self.eof or self.fd < 0:
            return False
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        got = False
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return got
            if not chunk:
                self.eof = True
                return got
            self.data += chunk
            got = True

    @property
    def text(self) -> str:
        self.poll()
        return self.data.decode(errors="replace")

    def search(self, pattern: str) -> re.Match | None:
        return re.search(pattern, self.text, re.M)

    def read_to_eof(self, seconds: float = 10.0) -> str:
        """Everything, once every writer (the fixture and its children) has closed the pipe."""
        deadline = time.monotonic() + seconds
        while not self.eof and time.monotonic() < deadline:
            self.poll(0.05)
        return self.text

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
    """One fixture process: its pyprobes Process (None until attached), stdout, stdin pipe."""

    def __init__(self, pid: int, output: Output, exe: Path, stdin: int | None,
                 proc: pyprobes.Process | None = None, popen: subprocess.Popen | None = None) -> None:
        self.pid = pid
        self.output = output
        self.exe = exe
        self.stdin = stdin   # write end of the fixture's stdin, or None
        self.proc = proc
        self.popen = popen
        self.tracee: Tracee | None = None   # when the tracee layer attached to it (attach_tracee)
        self.reaped: int | None = None      # exit code once wait_exit() reaped it

    @property
    def text(self) -> str:
        return self.output.text

    @property
    def results(self) -> dict[tuple[str, ...], dict[str, int]]:
        return parse_output(self.text)

    @property
    def addresses(self) -> dict[str, int]:
        """The "NAME 0xADDRESS" lines the fixture printed about itself."""
        return {m[1]: int(m[2], 16) for m in re.finditer(r"^(\S+) (0x[0-9a-fA-F]+)$", self.text, re.M)}

    def finish(self) -> int | None:
        """Run to exit (again after any stop() from a handler); the exit code."""
        while self.proc.alive:
            self.proc.run()
        return self.proc.exit_code

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.text.splitlines() if line.startswith(prefix)]

    def write(self, data: bytes | str) -> None:
        assert self.stdin is not None
        os.write(self.stdin, data.encode() if isinstance(data, str) else data)

    def close_stdin(self) -> None:
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None

    def _exited(self) -> bool:
        """Untraced: has the process ended (a zombie or reaped)? Not reaped here."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
        except FileNotFoundError:
            return True

    def wait_output(self, pattern: str, seconds: float = 20.0) -> re.Match:
        """Wait (without tracing) until stdout matches PATTERN (a regex, multiline)."""
        deadline = time.monotonic() + seconds
        while True:
            m = re.search(pattern, self.text, re.M)
            if m:
                return m
            if (self.proc is None and self.tracee is None and self._exited()
                    and not re.search(pattern, self.output.read_to_eof(1.0), re.M)):
                raise AssertionError(f"process exited before {pattern!r}; output: {self.text!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen after {seconds} s; output: {self.text!r}")
            self.output.poll(0.005)

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
        if self.reaped is not None:
            return self.reaped
        deadline = time.monotonic() + seconds
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.reaped = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
                if self.popen is not None:
                    self.popen.returncode = self.reaped  # reaped here; keep Popen from waiting again
                return self.reaped
            if time.monotonic() > deadline:
                raise AssertionError(f"PID {self.pid} still running after {seconds} s; output: {self.text!r}")
            self.output.poll(0.005)


@contextlib.contextmanager
def _stdio(stdout: int, stdin: int | None) -> Iterator[None]:
    """Our fds 1 (and 0) pointing at STDOUT (and STDIN) while a child is started by fork."""
    saved_out = os.dup(1)
    saved_in = os.dup(0) if stdin is not None else None
    try:
        os.dup2(stdout, 1)
        if stdin is not None:
            os.dup2(stdin, 0)
        yield
    finally:
        os.dup2(saved_out, 1)
        os.close(saved_out)
        if saved_in is not None:
            os.dup2(saved_in, 0)
            os.close(saved_in)


class Procs:
    """Everything a test starts; all of it is killed and reaped at teardown."""

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self.tracees: list[Tracee] = []   # tracee-layer tracers; register one made by hand here
        self.outputs: list[Output] = []
        self.pids: list[int] = []         # other processes a test started itself, killed (and reaped if ours)

    def _pipes(self, stdin_pipe: bool) -> tuple[Output, int, int | None, int | None]:
        r, w = os.pipe()
        output = Output(r)
        self.outputs.append(output)
        in_r = in_w = None
        if stdin_pipe:
            in_r, in_w = os.pipe()
        return output, w, in_r, in_w

    def spawn(self, exe: Path, *args, stdin_pipe: bool = False) -> Run:
        """The fixture started under pyprobes (stopped at its exec)."""
        output, out_w, in_r, in_w = self._pipes(stdin_pipe)
        try:
            with _stdio(out_w, in_r):
                proc = pyprobes.spawn([str(exe), *map(str, args)])
        finally:
            os.close(out_w)
            if in_r is not None:
                os.close(in_r)
        run = Run(proc.pid, output, exe, in_w, proc=proc)
        self.runs.append(run)
        return run

    def start(self, exe: Path | str, *args, stdin_pipe: bool = True) -> Run:
        """The fixture started plainly (to attach to later, or never traced)."""
        output, out_w, in_r, in_w = self._pipes(stdin_pipe)
        try:
            popen = subprocess.Popen([str(exe), *map(str, args)], stdout=out_w,
                                     stdin=in_r if in_r is not None else subprocess.DEVNULL)
        finally:
            os.close(out_w)
            if in_r is not None:
                os.close(in_r)
        run = Run(popen.pid, output, Path(exe), in_w, popen=popen)
        self.runs.append(run)
        return run

    def attach(self, run: Run) -> pyprobes.Process:
        """pyprobes.attach to a started fixture."""
        run.proc = pyprobes.attach(run.pid)
        return run.proc

    def spawn_tracee(self, argv, env: dict[str, str] | None = None) -> tuple[Tracee, Output]:
        """The tracee layer alone: Tracee.spawn(ARGV), its stdout in a pipe (stderr stays ours)."""
        output, out_w, _, _ = self._pipes(False)
        try:
            with _stdio(out_w, None):
                tracee = Tracee.spawn([str(a) for a in argv], env=env)
        finally:
            os.close(out_w)
        self.tracees.append(tracee)
        return tracee, output

    def attach_tracee(self, run_or_pid: Run | int) -> Tracee:
        """Tracee.attach to a started fixture (or any PID), cleaned up at teardown."""
        pid = run_or_pid.pid if isinstance(run_or_pid, Run) else run_or_pid
        tracee = Tracee.attach(pid)
        if isinstance(run_or_pid, Run):
            run_or_pid.tracee = tracee
        self.tracees.append(tracee)
        return tracee

    def detached(self, argv) -> int:
        """Start ARGV as a grandchild (not our child: a tracer's waitpid(-1) never reaps it)."""
        rfd, wfd = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.close(rfd)
                grandchild = os.fork()
                if grandchild == 0:
                    os.close(wfd)
                    devnull = os.open(os.devnull, os.O_RDWR)
                    os.dup2(devnull, 0)
                    os.dup2(devnull, 1)
                    os.execv(str(argv[0]), [str(a) for a in argv])
                os.write(wfd, str(grandchild).encode())
            finally:
                os._exit(0)
        os.close(wfd)
        os.waitpid(child, 0)
        with os.fdopen(rfd) as f:
            pid = int(f.read())
        self.pids.append(pid)
        return pid

    def kill_all(self) -> None:
        """SIGKILL everything (the watchdog's move: a killed process ends any wait for it)."""
        pids = [run.pid for run in self.runs] + [t.pid for t in self.tracees] + self.pids
        for pid in pids:
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
        for tracee in self.tracees:
            try:
                if tracee.alive and tracee.attached:
                    os.kill(tracee.pid, signal.SIGKILL)
                    tracee.kill()
            except (OSError, TraceeError):
                pass
        self.kill_all()
        ours = {run.pid for run in self.runs if run.reaped is None}
        ours |= {t.pid for t in self.tracees if t.spawned}
        ours |= set(self.pids)
        _reap(ours)
        for run in self.runs:
            if run.popen is not None:
                run.popen.returncode = -9 if run.reaped is None else run.reaped
            run.close_stdin()
        for output in self.outputs:
            output.close()


def _reap(pids: set[int], seconds: float = 10.0) -> None:
    """Reap PIDS (killed children of ours), and any traced thread whose exit holds one back."""
    left = set(pids)
    deadline = time.monotonic() + seconds
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG | WALL)[0] == pid:
                    left.discard(pid)
            except ChildProcessError:
                left.discard(pid)
        try:
            while os.waitpid(-1, os.WNOHANG | WALL)[0] > 0:
                pass
        except ChildProcessError:
            return
        if left:
            time.sleep(0.001)


@contextlib.contextmanager
def watchdog(procs: Procs, what: str, seconds: float, on_fire: Callable[[str], None]) -> Iterator[None]:
    """Kill every process of PROCS if the block (cleanup included) runs past SECONDS, then call
    ON_FIRE with a message. A thread timer, not SIGALRM: Process.run(timeout=) uses that."""
    fired = []
    timer = threading.Timer(seconds, lambda: (fired.append(True), procs.kill_all()))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        try:
            procs.cleanup()
        finally:
            timer.cancel()
    if fired:
        on_fire(f"watchdog: {what} ran over {seconds} s; its processes were killed")


def wait_stop(tid: int) -> int:
    """Block until thread TID (traced by us) is in a stop, without consuming it: the signal of
    its stop (SIGTRAP, SIGSEGV ...). The tracer's own later wait() still sees the stop."""
    info = os.waitid(os.P_PID, tid, os.WSTOPPED | os.WNOWAIT | WALL)
    assert info is not None and info.si_code == os.CLD_TRAPPED, info
    return info.si_status


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


def signals_pending(pid: int) -> set[int]:
    """The signals pending for the whole process PID (ShdPnd in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("ShdPnd:"):
                mask = int(line.split()[1], 16)
                return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    return set()


def text_differences(pid: int, exe: Path) -> list[str]:
    """Where PID's mapped executable segments of EXE differ from the file (empty: identical)."""
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
