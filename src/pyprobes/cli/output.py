"""Where reports go (stderr or -o FILE) and how they look: rich tables, JSON, one-line errors."""
from __future__ import annotations

import json
import sys
from typing import IO, TYPE_CHECKING, Iterable

from pyprobes import PyprobesError


if TYPE_CHECKING:  # rich is imported when a table is drawn: 80 ms less before the first probe
    from rich.console import Console
    from rich.table import Table

    from pyprobes import LatencyHistogram

PROG = "pyprobes"
MANY_ROWS = 50  # a count table longer than this shows only the probes that were hit


class CliError(PyprobesError):
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
        self._console: "Console | None" = None

    @property
    def console(self) -> "Console":
        if self._console is None:
            from rich.console import Console
            self._console = Console(file=self.stream, highlight=False, soft_wrap=False,
                                    width=None if self.stream.isatty() else 120)
        return self._console

    def write(self, text: str) -> None:
        self.stream.write(text)

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")

    def json(self, obj) -> None:
        self.stream.write(json.dumps(obj) + "\n")
        self.stream.flush()

    def table(self, table: "Table") -> None:
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


def count_table(rows: Iterable[dict]) -> "Table":
    from rich.table import Table

    table = Table()
    table.add_column("probe")
    table.add_column("address", justify="right")
    table.add_column("mode")
    table.add_column("hits", justify="right")
    table.add_column("missed", justify="right")
    for r in rows:
        table.add_row(r["probe"], r["address"] or "-", r["mode"], str(r["hits"]), str(r["missed"]))
    return table


def _size(n: int) -> str:
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def histogram_text(title: str, hist: "LatencyHistogram", width: int = 52) -> str:
    """bpftrace's layout: [lo, hi)  count |@@@@   |, one row per log2 bucket."""
    rows = hist.log2_rows()
    top = max((n for _, _, n in rows), default=0) or 1
    lines = [f"{title}: {hist.count} calls, min {hist.min}, mean {hist.sum // max(hist.count, 1)}, "
             f"max {hist.max}"]
    for lo, hi, n in rows:
        label = "[0]" if hi == 1 else f"[{_size(lo)}, {_size(hi)})"
        lines.append(f"{label:<20}{n:>8} |{'@' * (n * width // top):<{width}}|")
    return "\n".join(lines) + "\n\n"
