"""`pyprobes trace --optimize` (issue 11): entry hits recorded in the process (a ring buffer),
printed as trace prints hits, every one of them, and the drops said at the end."""
from __future__ import annotations

import json
import re

from cli2_util import cli


def test_trace_optimize_prints_every_record_with_its_arguments(build):
    exe = build("opt_record.c", "-pthread")
    r = cli("trace", "--optimize", "--json", "--args", "6", "rec_f", "--", str(exe), "2000", "2")
    assert r.returncode == 0, r.stderr
    assert "total calls 4000 bad 0" in r.stdout
    rows = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert len(rows) == 4000
    tids = {int(line.split()[3]) for line in r.stdout.splitlines() if line.startswith("thread ")}
    assert {row["tid"] for row in rows} == tids
    for row in rows:
        i = row["args"][0]
        assert row["probe"] == "opt_record:rec_f" and row["args"] == [i, 2 * i, 3 * i, 4 * i, 5 * i, 6 * i]
    assert "records lost" not in r.stderr


def test_trace_optimize_text_lines(build):
    exe = build("opt_record.c", "-pthread")
    r = cli("trace", "--optimize", "rec_f", "--", str(exe), "3", "1")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if " opt_record:rec_f(" in line]
    assert [line.split(None, 2)[2] for line in lines] == ["opt_record:rec_f(0x1, 0x2, 0x3)", "opt_record:rec_f(0x2, 0x4, 0x6)",
                                                          "opt_record:rec_f(0x3, 0x6, 0x9)"]


def test_trace_optimize_says_how_many_records_were_lost(build):
    exe = build("opt_record.c", "-pthread")
    r = cli("trace", "--optimize", "--ring", "16", "--json", "rec_f", "--", str(exe), "100000", "2")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stderr.splitlines() if line.startswith("{")]
    (lost,) = [int(re.search(r"(\d+) records lost", line)[1]) for line in r.stderr.splitlines()
               if "records lost" in line]
    assert lost > 0 and len(rows) + lost == 200000
    r = cli("trace", "--optimize", "--ring", "1000", "rec_f", "--", str(exe), "1", "1")
    assert r.returncode == 2 and "power of two" in r.stderr
