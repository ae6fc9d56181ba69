"""Live fixture processes for the symbol tests (started through every suite's `procs`)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def spawn(procs):
    """spawn(exe, *args) -> the started fixture (processes.Run) once it printed "ready", with the
    addresses it printed about itself in .addresses; killed at the end of the test."""

    def start(exe: Path, *args: str):
        run = procs.start(exe, *args)
        run.wait_output(r"^ready$")
        return run

    return start


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
