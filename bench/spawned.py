"""A workload started under pyprobes with its stdout in a file, where it prints its result line."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator

import pyprobes


@contextmanager
def spawned(argv: list[str]) -> Iterator[tuple[pyprobes.Process, Callable[[], str]]]:
    """pyprobes.spawn(ARGV) with the program's stdout in a temporary file (a pipe could fill
    while the tracer is not reading it): (the process, a function giving what it printed so
    far). The process is detached or killed on leaving."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(1)
        try:
            os.dup2(out.fileno(), 1)
            proc = pyprobes.spawn(argv)
        finally:
            os.dup2(saved, 1)
            os.close(saved)

        def printed() -> str:
            out.seek(0)
            return out.read().decode()

        with proc:
            yield proc, printed
