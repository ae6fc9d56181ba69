"""Two functions of one name (two `static` helpers of two source files) are two rows, each
with its own hits and a name the user can tell apart, in the table and in JSON."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "pyprobes"]


def _exe(build):
    other = Path(__file__).parent.parent / "fixtures" / "cli_dup_other.c"
    digest = hashlib.sha256(other.read_bytes()).hexdigest()[:12]  # the second source keys the cache too
    return build("cli_dup_main.c", str(other), f"-DOTHER_SOURCE_{digest}")


def test_two_static_functions_of_one_name_are_two_rows(build):
    exe = _exe(build)
    r = subprocess.run([*CLI, "count", "--json", "cli_dup_helper", "--", str(exe)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "main 3 other 5\n"
    report = json.loads(r.stderr.strip().splitlines()[-1])
    rows = report["probes"]
    assert sorted(row["hits"] for row in rows) == [3, 5], rows
    names = [row["probe"] for row in rows]
    assert len(set(names)) == 2 and all("cli_dup_helper@0x" in n for n in names), names
    assert len({row["address"] for row in rows}) == 2

    table = subprocess.run([*CLI, "count", "cli_dup_helper", "--", str(exe)], capture_output=True, text=True,
                           timeout=60)
    for name in names:
        assert name in table.stderr, table.stderr


def test_the_table_has_no_trailing_spaces(build):
    """stderr not a tty: nothing pads the title (or any line) to the table's width."""
    r = subprocess.run([*CLI, "count", "cli_dup_helper", "--", str(_exe(build))], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    assert r.stderr.splitlines()[0].startswith("pyprobes count: ")
    assert [line for line in r.stderr.splitlines() if line != line.rstrip()] == []
