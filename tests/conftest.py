"""Shared test helpers: C fixtures compiled with the machine's gcc at test time."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

# The suite's processes get the signals an interactive shell gives: a run started in the
# background (SIGINT ignored, as a non-interactive shell does for `cmd &`) would otherwise pass
# SIG_IGN on to every process a test starts, and pyprobes rightly keeps an ignored SIGINT ignored.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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


WATCHDOG = 120.0  # seconds; a test reaching it has hung, not run slowly (even on a loaded machine)


@pytest.fixture
def procs(request):
    """Every suite's fixture processes (tests/processes.py): started traced or not, stdout read
    without blocking, killed and reaped at teardown; a watchdog kills them and fails the test
    if it hangs."""
    from processes import Procs, watchdog

    p = Procs()
    with watchdog(p, request.node.nodeid, WATCHDOG, pytest.fail):
        yield p
