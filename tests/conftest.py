"""Shared test helpers: C fixtures compiled with the machine's gcc at test time."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CACHE = Path(os.environ.get("PYPROBES_FIXTURE_CACHE", Path(__file__).parent / ".fixture-cache"))


def compile_fixture(source: str, *flags: str, output: str | None = None, compiler: str = "gcc") -> Path:
    """Compile tests/fixtures/SOURCE with gcc and FLAGS; cached by source text and flags."""
    src = FIXTURES / source
    text = src.read_bytes()
    key = hashlib.sha256(text + "\0".join((compiler,) + flags).encode()).hexdigest()[:16]
    name = output or src.stem
    out_dir = CACHE / key
    exe = out_dir / name
    if exe.exists():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (name + ".tmp")
    cmd = [compiler, "-g", "-O1", "-o", str(tmp), str(src), *flags]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {source} failed:\n{' '.join(cmd)}\n{result.stderr}")
    os.replace(tmp, exe)
    return exe


@pytest.fixture(scope="session")
def build():
    """build(source, *flags, output=None) -> Path of the compiled fixture."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return compile_fixture


@pytest.fixture(scope="session")
def fixture(build):
    """fixture(name, *flags) -> the compiled tests/fixtures/NAME.c (-pthread), or NAME.cpp with g++."""

    def get(name: str, *flags: str) -> Path:
        if name.endswith(".cpp"):
            return build(name, "-pthread", *flags, compiler="g++")
        return build(name + ".c", "-pthread", *flags)

    return get


@contextmanager
def watchdog(procs, request, seconds: float) -> Iterator[None]:
    """Kill every process of PROCS (anything with kill_all() and cleanup()) if the test runs past
    SECONDS, then fail it; clean up in any case. A thread timer, not SIGALRM: run(timeout=) uses that."""
    fired = []
    timer = threading.Timer(seconds, lambda: (fired.append(True), procs.kill_all()))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        procs.cleanup()
    if fired:
        pytest.fail(f"watchdog: {request.node.nodeid} ran over {seconds} s; its processes were killed")


WATCHDOG = 120.0  # seconds; a test reaching it has hung, not run slowly (even on a loaded machine)


@pytest.fixture
def procs(tmp_path, request):
    """The engine and return-probe tests' fixture processes (tests/processes.py), killed and reaped
    at teardown; a watchdog fails a test that hangs (tests/tracee has its own `procs`)."""
    from processes import Procs

    p = Procs(tmp_path)
    with watchdog(p, request, WATCHDOG):
        yield p
