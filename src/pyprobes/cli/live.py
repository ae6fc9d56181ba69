"""`count -i` in a terminal: one table redrawn in place every interval (rich's Live), with each
probe's hits, its rate over the interval, and its latency percentiles over the interval.

Not a terminal (a pipe, a file, -o FILE) or --json: count.py prints a table or a JSON object
every interval instead, as it always did.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

from .output import MANY_ROWS, Report

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.live import Live

    from pyprobes import LatencyHistogram

class LiveRow(NamedTuple):
    """A probe as the live view shows it; LATENCY is the histogram of its whole run so far."""

    name: str
    mode: str
    hits: int
    missed: int
    latency: "LatencyHistogram | None"


def is_live_terminal(report: Report) -> bool:
    """The report goes to a terminal that can redraw in place (not -o FILE, not TERM=dumb)."""
    if report.path is not None or not report.stream.isatty():
        return False
    console = report.console
    return console.is_terminal and not console.is_dumb_terminal


def duration_text(ns: float | None) -> str:
    if ns is None:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.0f} ns"


def rate_text(per_second: float) -> str:
    return f"{per_second:.1f}" if per_second < 100 else f"{per_second:.0f}"


class LiveCounts:
    """The live view: `with view: session.run(..., tick=view.tick)`.

    SNAPSHOT gives the rows now, CLOCK the seconds since the probes went in. Leaving the
    `with` (the run's end, Ctrl-C, SIGTERM, an error) erases the view and gives the cursor back;
    the final table is printed after it, as without the view."""

    def __init__(self, report: Report, snapshot: Callable[[], list[LiveRow]], clock: Callable[[], float]) -> None:
        self.report = report
        self.snapshot = snapshot
        self.clock = clock
        self._live: "Live | None" = None
        self._hits: dict[str, int] = {}
        self._latency: dict[str, "LatencyHistogram"] = {}
        self._time = 0.0

    def __enter__(self) -> "LiveCounts":
        from rich.live import Live

        rows = self.snapshot()
        self._remember(rows, self.clock())
        # No refresh thread: the view is drawn from tick(), between two runs of the event loop,
        # so drawing never competes with the tracer for the interpreter.
        self._live = Live(self._render(rows, None), console=self.report.console,
                          auto_refresh=False, transient=True, redirect_stdout=False, redirect_stderr=True)
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.__exit__(*exc)
            self.report.flush()

    def tick(self) -> None:
        rows, now = self.snapshot(), self.clock()
        if self._live is not None:
            self._live.update(self._render(rows, now), refresh=True)
        self._remember(rows, now)

    # ------------------------------------------------------------------ drawing
    def _remember(self, rows: list[LiveRow], now: float) -> None:
        self._time = now
        self._hits = {r.name: r.hits for r in rows}
        self._latency = {r.name: r.latency.copy() for r in rows if r.latency is not None}

    def _interval_latency(self, row: LiveRow) -> "LatencyHistogram | None":
        if row.latency is None:
            return None
        before = self._latency.get(row.name)
        if before is None:
            return row.latency
        try:
            return row.latency.difference(before)
        except ValueError:  # a new histogram (the probe placed again): all of it is new
            return row.latency

    def _render(self, rows: list[LiveRow], now: float | None) -> "RenderableType":
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        shown = rows if len(rows) <= MANY_ROWS else [r for r in rows if r.hits or r.missed]
        latency = any(r.latency is not None for r in rows)
        missed = any(r.missed for r in rows)
        table = Table()
        table.add_column("probe")
        table.add_column("mode")
        table.add_column("hits", justify="right")
        table.add_column("rate/s", justify="right")
        if missed:
            table.add_column("missed", justify="right")
        if latency:
            for name in ("p50", "p99", "max"):
                table.add_column(name, justify="right")
        elapsed = None if now is None else now - self._time
        for r in shown:
            cells = [r.name, r.mode, str(r.hits)]
            cells.append("-" if not elapsed else rate_text((r.hits - self._hits.get(r.name, 0)) / elapsed))
            if missed:
                cells.append(str(r.missed))
            if latency:
                hist = None if now is None else self._interval_latency(r)
                if hist is None or not hist.count:
                    cells.extend(["-"] * 3)
                else:
                    cells.extend(duration_text(v) for v in (hist.percentile(50), hist.percentile(99), hist.max))
            table.add_row(*cells)
        if now is None:
            title = "pyprobes count: starting (live; the final table follows at the end)"
        else:
            title = (f"pyprobes count: {now:.1f} s; rate{' and latency' if latency else ''} "
                     f"over the last {elapsed:.1f} s (live; the final table follows at the end)")
        lines: list = [Text(title), table]
        if len(shown) < len(rows):
            lines.append(Text(f"{len(rows) - len(shown)} of {len(rows)} probes had no hits and are not shown"))
        return Group(*lines)
