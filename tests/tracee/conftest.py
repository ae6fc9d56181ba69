"""Helpers for the tracee-control tests: traced fixture processes whose stdout we read,
an event pump, hang guards, and cleanup that kills whatever a failed test left behind.

No pytest-timeout here: every test runs under a SIGALRM hang guard (HANG_GUARD seconds),
and every process a test starts is SIGKILLed and reaped at teardown.
"""
from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pyprobes.tracee import Tracee, TraceeError
from pyprobes.tracee.errors import ProcessExited

HANG_GUARD = 45  # seconds; a test hitting it has hung, not run slowly


class Hang(Exception):
    """A hang guard fired."""


@contextlib.contextmanager
def hang_guard(seconds: float, what: str = "test"):
    """Raise Hang in the main thread if the block runs longer than SECONDS (wall clock)."""

    def fire(signum, frame):
        raise Hang(f"{what} still running after {seconds} s: hung")

    old = signal.signal(signal.SIGALRM, fire)
    previous = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if previous[0]:
            signal.setitimer(signal.ITIMER_REAL, *previous)


@pytest.fixture(autouse=True)
def _hang_guard(request):
    with hang_guard(HANG_GUARD, request.node.nodeid):
        yield


class Output:
    """The read end of a pipe that a fixture's stdout writes into; never blocks."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.data = b""
        self.eof = False

    def poll(self, timeout: float = 0.0) -> bool:
        """Read what is there (waiting up to TIMEOUT for something); True if anything came."""
        if self.eof:
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
        return self.data.decode(errors="replace")

    def search(self, pattern: str) -> re.Match | None:
        return re.search(pattern, self.text, re.M)

    def read_to_eof(self, seconds: float = 10.0) -> str:
        deadline = time.monotonic() + seconds
        while not self.eof and time.monotonic() < deadline:
            self.poll(0.05)
        return self.text

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def pump(tracee: Tracee, until, seconds: float = 10.0, output: Output | None = None, on_event=None):
    """Handle the tracee's events the default way until UNTIL() is true; fail after SECONDS.

    ON_EVENT(event), if given, sees every event first and returns True when it handled it.
    Returns UNTIL()'s true value.
    """
    deadline = time.monotonic() + seconds
    while True:
        while True:
            event = tracee.wait(block=False)
            if event is None:
                break
            if on_event is None or not on_event(event):
                tracee.handle_default(event)
        if output is not None:
            output.poll()
        value = until()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met after {seconds} s"
                                 + (f"; output so far: {output.text!r}" if output else ""))
        if output is not None:
            output.poll(0.001)
        else:
            time.sleep(0.001)


def drain(tracee: Tracee, on_event=None) -> list:
    """Handle every event already waiting, the default way; return them."""
    seen = []
    while True:
        event = tracee.wait(block=False)
        if event is None:
            return seen
        seen.append(event)
        if on_event is None or not on_event(event):
            tracee.handle_default(event)


def proc_tids(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def proc_state(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class Processes:
    """Everything a test starts; all of it is killed and reaped at teardown."""

    def __init__(self) -> None:
        self.tracees: list[Tracee] = []
        self.popens: list[subprocess.Popen] = []
        self.pids: list[int] = []  # not our children (double-forked helpers)
        self.outputs: list[Output] = []

    def spawn(self, argv, env=None) -> tuple[Tracee, Output]:
        """Tracee.spawn(ARGV) with its stdout going into a pipe we read (stderr stays ours)."""
        argv = [str(a) for a in argv]
        r, w = os.pipe()
        saved = os.dup(1)
        try:
            os.dup2(w, 1)
            try:
                tracee = Tracee.spawn(argv, env=env)
            finally:
                os.dup2(saved, 1)
        finally:
            os.close(saved)
            os.close(w)
        out = Output(r)
        self.outputs.append(out)
        self.tracees.append(tracee)
        return tracee, out

    def popen(self, argv, **kw) -> subprocess.Popen:
        proc = subprocess.Popen([str(a) for a in argv], **kw)
        self.popens.append(proc)
        return proc

    def detached(self, argv) -> int:
        """Start ARGV as a grandchild (not our child: the tracer's waitpid(-1) never reaps it)."""
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
                    os.execv(argv[0], [str(a) for a in argv])
                os.write(wfd, str(grandchild).encode())
            finally:
                os._exit(0)
        os.close(wfd)
        os.waitpid(child, 0)
        with os.fdopen(rfd) as f:
            pid = int(f.read())
        self.pids.append(pid)
        return pid

    def cleanup(self) -> None:
        for tracee in self.tracees:
            if not tracee.alive:
                continue
            if tracee.attached:
                try:
                    os.kill(tracee.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    with hang_guard(10, "killing a tracee at teardown"):
                        tracee.kill()
                except (Hang, OSError, TraceeError):
                    pass
            elif tracee.spawned:
                # Detached, but still our child: kill and reap it.
                try:
                    os.kill(tracee.pid, signal.SIGKILL)
                    with hang_guard(10, "reaping a detached child at teardown"):
                        os.waitpid(tracee.pid, 0)
                except (Hang, OSError):
                    pass
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.popens:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for out in self.outputs:
            out.close()


@pytest.fixture
def procs():
    p = Processes()
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture(scope="session")
def fixture(build):
    """fixture(name) -> path of tests/fixtures/NAME.c compiled with -pthread."""

    def get(name: str) -> Path:
        return build(name + ".c", "-pthread")

    return get


def expect_exit(tracee: Tracee, seconds: float = 20.0) -> int | None:
    """run_to_exit() under a hang guard; the exit code."""
    with hang_guard(seconds, "run_to_exit"):
        return tracee.run_to_exit()


def wait_exit_via_events(tracee: Tracee) -> ProcessExited:
    """Handle events until ProcessExited is raised; return it."""
    while True:
        try:
            event = tracee.wait()
        except ProcessExited as e:
            return e
        tracee.handle_default(event)
