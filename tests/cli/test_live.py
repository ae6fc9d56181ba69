"""`count -i` in a terminal: a live view redrawn in place (rich's Live) on a pseudo-terminal,
then the final table once; with --json, -o FILE or a pipe, the plain interval reports as before.

pyprobes' report goes to stderr, so stderr is the pseudo-terminal here; the fixture's stdout is
a pipe, read for its own count of calls."""
from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time

import pytest

from cli2_util import CLI, cli, json_lines

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SHOW_CURSOR, HIDE_CURSOR = "\x1b[?25h", "\x1b[?25l"
CALLS, GAP_US = 300, 3000  # eng_paced runs at least CALLS * GAP_US = 0.9 s: several 0.2 s intervals
UNITS = {"ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9}


@pytest.fixture(scope="module")
def paced(fixture):
    return fixture("eng_paced")


class OnTerminal:
    """pyprobes ARGS with stderr on a pseudo-terminal (160x40) and stdout on a pipe."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS", "LINES")}
        environ.update(TERM="xterm-256color", **(env or {}))
        self.proc = subprocess.Popen([*CLI, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=slave, env=environ)
        os.close(slave)
        self.raw = ""

    def read_until(self, pattern: str, limit: float = 60) -> bool:
        """Read the terminal until PATTERN shows (in its text without escapes) or it closes."""
        deadline = time.monotonic() + limit
        while not re.search(pattern, ANSI.sub("", self.raw)):
            if not select.select([self.master], [], [], max(deadline - time.monotonic(), 0))[0]:
                return False
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:  # EIO: every writer closed the terminal
                return False
            if not data:
                return False
            self.raw += data.decode(errors="replace")
        return True

    def finish(self) -> tuple[int, str]:
        self.read_until(r"(?!)")  # to the end
        out = self.proc.stdout.read().decode()
        code = self.proc.wait(60)
        os.close(self.master)
        return code, out

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw).replace("\r", "")


def cells(text: str, probe: str) -> list[list[str]]:
    """The cells of every table row (live frames and the final table) of PROBE, in order."""
    return [[c.strip() for c in line.split("│")[2:-1]]
            for line in text.splitlines() if re.match(rf"│ \S*{re.escape(probe)} +│", line)]


def ns(cell: str) -> float:
    number, unit = cell.split()
    return float(number) * UNITS[unit]


def final_table(text: str) -> str:
    """What follows the live view: the final table's title, on a line of its own."""
    match = list(re.finditer(r"^pyprobes count: [\d.]+ s$", text, re.M))
    assert len(match) == 1, text[-3000:]
    return text[match[0].start():]


def test_live_view_then_the_final_table(paced):
    term = OnTerminal("count", "-i", "0.2", "--latency", "paced_hit", "paced_hit%return",
                      "--", str(paced), "1", str(CALLS), str(GAP_US))
    code, out = term.finish()
    assert code == 0 and out == f"calls {CALLS}\n"
    text = term.text
    live, final = text[:text.index(final_table(text))], final_table(text)
    # The live frames: hits, the interval's rate, and for the return probe its latency percentiles.
    assert "rate and latency over the last" in live
    frames = cells(live, "paced_hit%return")  # probe-less columns: mode, hits, rate/s, p50, p99, max
    assert frames and all(f[0] == "return" for f in frames)
    hits = [int(f[1]) for f in frames]
    assert hits == sorted(hits) and 0 < hits[-1] <= CALLS
    first_hit = next(f for f in frames if int(f[1]) > 0)  # the first frame after a call: a rate, percentiles
    assert float(first_hit[2]) > 0
    assert 0 < ns(first_hit[3]) <= ns(first_hit[4]) <= ns(first_hit[5])
    assert all(f[3:] == ["-", "-", "-"] for f in cells(live, "paced_hit") if f[0] != "return")
    # Drawn in place, then gone, the cursor back; the final table printed once, as without a terminal.
    assert live.count("pyprobes count:") == len(frames) > 1
    assert term.raw.rindex(SHOW_CURSOR) > term.raw.rindex(HIDE_CURSOR)
    (row,) = cells(final, "paced_hit%return")
    assert row[1:] == ["return", str(CALLS), "0"]  # address, mode, hits, missed
    assert re.search(rf"paced_hit%return latency \(ns\): {CALLS} calls, min \d+, mean \d+, max \d+", final)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_leaves_the_terminal_clean_and_prints_the_final_table(paced, stop):
    term = OnTerminal("count", "-i", "0.2", "paced_hit", "--", str(paced), "1", "100000", str(GAP_US))
    assert term.read_until(r"over the last"), term.text
    term.proc.send_signal(stop)
    code, out = term.finish()
    assert code == 128 + stop and out == ""  # passed on to the command, which it killed
    assert term.raw.rindex(SHOW_CURSOR) > term.raw.rindex(HIDE_CURSOR)
    final = final_table(term.text)
    live_hits = [int(f[1]) for f in cells(term.text[:term.text.index(final)], "paced_hit")]
    (row,) = cells(final, "paced_hit")
    assert int(row[2]) >= max(live_hits) and row[3] == "0"


def test_json_on_a_terminal_stays_plain(paced):
    term = OnTerminal("count", "--json", "-i", "0.2", "paced_hit", "--", str(paced), "1", str(CALLS), str(GAP_US))
    code, out = term.finish()
    assert code == 0 and out == f"calls {CALLS}\n"
    assert HIDE_CURSOR not in term.raw and "over the last" not in term.text
    reports = json_lines(term.text)
    assert len(reports) > 1 and all(r["final"] is False for r in reports[:-1]) and "final" not in reports[-1]
    assert reports[-1]["probes"][0]["hits"] == CALLS


def test_output_file_on_a_terminal_stays_plain(paced, tmp_path):
    report = tmp_path / "report.txt"
    term = OnTerminal("count", "-i", "0.2", "-o", str(report), "paced_hit",
                      "--", str(paced), "1", str(CALLS), str(GAP_US))
    code, out = term.finish()
    assert code == 0 and out == f"calls {CALLS}\n"
    assert HIDE_CURSOR not in term.raw and "over the last" not in term.text
    text = report.read_text()
    assert re.search(r"^pyprobes count: [\d.]+ s so far$", text, re.M)
    assert cells(final_table(text), "paced_hit")[0][2] == str(CALLS)


def test_a_pipe_gets_the_plain_tables(paced):
    r = cli("count", "-i", "0.2", "paced_hit", "--", str(paced), "1", str(CALLS), str(GAP_US))
    assert r.returncode == 0 and r.stdout == f"calls {CALLS}\n"
    assert HIDE_CURSOR not in r.stderr and "\x1b[" not in r.stderr
    assert re.search(r"^pyprobes count: [\d.]+ s so far$", r.stderr, re.M)
    assert cells(final_table(r.stderr), "paced_hit")[0][2] == str(CALLS)
