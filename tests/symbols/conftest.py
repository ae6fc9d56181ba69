"""Live fixture processes for the symbol tests."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Running:
    """A started fixture: its process and the addresses it printed about itself."""

    proc: subprocess.Popen
    exe: Path
    addresses: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


def _start(exe: Path, *args: str) -> Running:
    proc = subprocess.Popen(
        [str(exe), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    running = Running(proc, exe)
    for line in proc.stdout:
        line = line.strip()
        if line == "ready":
            return running
        name, _, value = line.partition(" ")
        try:
            running.addresses[name] = int(value, 16)
        except ValueError:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{exe}: unexpected output {line!r}") from None
    proc.wait()
    raise RuntimeError(f"{exe} exited with {proc.returncode} before it was ready")


@pytest.fixture
def spawn():
    """spawn(exe, *args) -> Running; every process is killed at the end of the test."""
    started: list[Running] = []

    def start(exe: Path, *args: str) -> Running:
        running = _start(exe, *args)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
        running.proc.wait()
        for stream in (running.proc.stdin, running.proc.stdout):
            stream.close()


@pytest.fixture(scope="session")
def pie(build) -> Path:
    return build("sym_loop.c")


@pytest.fixture(scope="session")
def nopie(build) -> Path:
    return build("sym_loop.c", "-no-pie", output="sym_loop_nopie")


@pytest.fixture(scope="session")
def shlib(build) -> Path:
    # First PT_LOAD at 0x200000: the load bias differs from the mapping base.
    return build("sym_lib.c", "-shared", "-fPIC", "-Wl,-Ttext-segment=0x200000", output="libsym_lib.so")
