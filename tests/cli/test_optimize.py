"""`pyprobes count` (issue 11): count probes jump-optimised by default where they can be, the
mode "optimized" in the report, counts exact at the end and at every tick; --no-optimize for
breakpoints only (--optimize, the old opt-in, still accepted); `pyprobes list` says which
would be optimised and why not; the demo shows both."""
from __future__ import annotations

import os
import subprocess

from cli2_util import CLI, by_symbol, cli, json_lines, last_json


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
    r = cli("count", "--json", "-i", "0.05", "opt_lea", "--", str(exe), "3000000", "1")
    assert r.returncode == 0, r.stderr
    reports = json_lines(r.stderr)
    hits = [report["probes"][0]["hits"] for report in reports]
    assert hits == sorted(hits) and hits[-1] == 3000000
    assert all(report["probes"][0]["mode"] == "optimized" for report in reports)


def test_count_optimizes_by_default_and_no_optimize_places_breakpoints(build):
    exe = build("opt_count.c", "-pthread")
    modes = {}
    for flags in ((), ("--no-optimize",)):
        r = cli("count", *flags, "-v", "--json", "opt_lea", "opt_jmp", "opt_copy", "opt_push%return",
                "--", str(exe), "3000", "2")
        assert r.returncode == 0, r.stderr
        assert "calls lea 6000 push 6000 jmp 60 red 6000 bad 0" in r.stdout
        rows = by_symbol(last_json(r.stderr))
        assert {name: row["hits"] for name, row in rows.items()} == {
            "opt_lea": 6000, "opt_jmp": 60, "opt_copy": 60, "opt_push%return": 6000}
        modes[flags] = {name: row["mode"] for name, row in rows.items()}
        said = [line for line in r.stderr.splitlines() if "not optimized" in line]
        placed = next(line for line in r.stderr.splitlines() if "opt_lea -> " in line)
        # -v says how each probe runs once the optimizer has been at it
        assert (", optimized: a jmp to a trampoline" in placed) == (not flags), placed
        if flags:
            assert said == []
        else:  # -v says why a probe stayed a breakpoint
            assert len(said) == 2 and ":opt_jmp: not optimized (emulated): 'jmp" in said[0]
            assert ":opt_copy: not optimized (boosted): a branch or address in" in said[1]
    # A return probe follows its calls in the process where its entry takes a jump.
    assert modes[()] == {"opt_lea": "optimized", "opt_jmp": "emulated", "opt_copy": "boosted",
                         "opt_push%return": "return optimized"}
    assert modes[("--no-optimize",)] == {"opt_lea": "boosted", "opt_jmp": "emulated",
                                         "opt_copy": "boosted", "opt_push%return": "return"}


def test_demo_counts_with_breakpoints_then_optimized(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    r = subprocess.run([*CLI, "demo", "--json", "--rounds", "20"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    first, second = (
        {p["probe"].split(":")[-1]: (p["mode"], p["hits"]) for p in report["probes"]}
        for report in json_lines(r.stderr))
    assert first == {"demo_work": ("emulated", 40), "demo_add": ("boosted", 80), "demo_tick": ("stepped", 4)}
    assert second == {"demo_work": ("optimized", 40), "demo_add": ("optimized", 80),
                      "demo_tick": ("stepped", 4)}
    assert r.stderr.count("exactly the program's own counts") == 2


def test_count_help_says_optimize():
    r = cli("count", "--help")
    assert "--optimize" in r.stdout and "default" in r.stdout
    assert "--no-optimize" in r.stdout and "breakpoints only" in r.stdout


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
