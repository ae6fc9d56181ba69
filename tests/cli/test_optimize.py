"""`pyprobes count --optimize` (issue 11): count probes jump-optimised where they can be, the
mode "optimized" in the report, counts exact at the end and at every tick."""
from __future__ import annotations

from cli2_util import by_symbol, cli, json_lines, last_json


def test_count_optimize(build):
    exe = build("opt_count.c", "-pthread")
    r = cli("count", "--optimize", "--json", "opt_lea", "opt_push", "opt_jmp", "--", str(exe), "50000", "4")
    assert r.returncode == 0, r.stderr
    assert "calls lea 200000 push 200000 jmp 2000 red 200000 bad 0" in r.stdout
    rows = by_symbol(last_json(r.stderr))
    assert {name: (row["mode"], row["hits"]) for name, row in rows.items()} == {
        "opt_lea": ("optimized", 200000), "opt_push": ("optimized", 200000),
        "opt_jmp": ("emulated", 2000)}


def test_count_optimize_ticks(build):
    exe = build("opt_count.c", "-pthread")
    r = cli("count", "--optimize", "--json", "-i", "0.05", "opt_lea", "--", str(exe), "3000000", "1")
    assert r.returncode == 0, r.stderr
    reports = json_lines(r.stderr)
    hits = [report["probes"][0]["hits"] for report in reports]
    assert hits == sorted(hits) and hits[-1] == 3000000
    assert all(report["probes"][0]["mode"] == "optimized" for report in reports)


def test_count_help_says_optimize():
    r = cli("count", "--help")
    assert "--optimize" in r.stdout and "default" in r.stdout


def test_list_says_whether_count_would_optimize(build):
    exe = build("opt_count.c", "-pthread")
    r = cli("list", str(exe), "opt_*")
    assert r.returncode == 0, r.stderr
    header, *lines = r.stdout.splitlines()
    assert header.split()[-1] == "OPTIMIZED"
    rows = {line.split()[3]: line for line in lines}
    assert rows["opt_lea"].split()[4] == "boosted" and rows["opt_lea"].endswith("  yes")
    assert rows["opt_jmp"].split()[4] == "emulated"
    assert "  no: 'jmp" in rows["opt_jmp"] and "within the 5 bytes a jmp needs" in rows["opt_jmp"]
    assert "  no: a branch or address in" in rows["opt_copy"]
    assert "OPTIMIZED" in cli("list", "--help").stdout
