"""Where reports go (stderr or -o FILE) and how they look: rich tables, JSON, one-line errors."""
from __future__ import annotations

import json
import sys
from typing import IO, Iterable

from rich.console import Console
from rich.table import Table

PROG = "pyprobes"


class CliError(Exception):
    """An error for the user: one line on stderr, then exit with STATUS (2 usage/spec, 1 runtime)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def error(message: str) -> None:
    """One line on stderr, prefixed like every pyprobes message."""
    line = " ".join(str(message).split("\n"))
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class Report:
    """The report stream: stderr unless -o FILE. The traced command's own streams are never touched."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        if path is None:
            # Our own buffered writer on fd 2: a trace writes many lines, one system call per line
            # would slow every hit. Flushed after each table, periodically while tracing, at exit.
            sys.stderr.flush()
            self.stream: IO[str] = open(sys.stderr.fileno(), "w", buffering=1 << 16, closefd=False)
            self._owned = True
        else:
            try:
                self.stream = open(path, "w", buffering=1 << 16)
            except OSError as e:
                raise CliError(f"cannot write {path}: {e.strerror}", 2) from None
            self._owned = True
        self.console = Console(file=self.stream, highlight=False, soft_wrap=False,
                               width=None if self.stream.isatty() else 120)

    def write(self, text: str) -> None:
        self.stream.write(text)

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")

    def json(self, obj) -> None:
        self.stream.write(json.dumps(obj) + "\n")
        self.stream.flush()

    def table(self, table: Table) -> None:
        self.console.print(table)
        self.stream.flush()

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self._owned:
            self.stream.close()


def count_table(rows: Iterable[dict], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("probe")
    table.add_column("address", justify="right")
    table.add_column("mode")
    table.add_column("hits", justify="right")
    table.add_column("missed", justify="right")
    for r in rows:
        table.add_row(r["probe"], r["address"], r["mode"], str(r["hits"]), str(r["missed"]))
    return table
