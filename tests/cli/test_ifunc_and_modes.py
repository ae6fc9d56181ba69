"""The command line on IFUNCs (ISSUE 14, item 6) and on probes never hit (item 7).

An IFUNC's row counts the implementation the loader selected and names it ("strlen ->
__strlen_avx2"); where nothing is resolved yet, a note says the probe is on the resolver. A
boostable probe that is never hit shows "boosted", as `pyprobes list` and -v say, not "stepped".
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import pyprobes

CLI = [sys.executable, "-m", "pyprobes"]
N = 40


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def _rows(stderr: str) -> dict[str, dict]:
    report = json.loads(stderr.strip().splitlines()[-1])
    return {row["probe"]: row for row in report["probes"]}


def test_count_names_the_selected_implementation(fixture):
    exe = fixture("eng_ifunc")
    r = cli("count", "--json", "ifunc_pick", "libc:strlen", "--", str(exe), str(N))
    assert r.returncode == 0, r.stderr
    assert f"second={N} resolver=1 strlen={N}" in r.stdout
    rows = _rows(r.stderr)
    assert rows[f"{exe.name}:ifunc_pick -> ifunc_second"]["hits"] == N
    (strlen,) = [name for name in rows if name.startswith("libc.so.6:strlen -> ")]
    assert rows[strlen]["hits"] >= N

    r = cli("count", "-v", "ifunc_pick", "libc:strlen", "--", str(exe), str(N))
    assert r.returncode == 0, r.stderr
    assert "ifunc_pick -> ifunc_second" in r.stderr and strlen in r.stderr
    placed = [line for line in r.stderr.splitlines() if line.startswith("pyprobes: ifunc_pick -> ")]
    assert len(placed) == 1 and "ifunc_pick is an IFUNC: this is the implementation the loader selected" \
        in placed[0], r.stderr
    assert "(ifunc resolver)" in cli("list", str(exe), "ifunc_pick").stdout  # list is unchanged


def test_count_says_when_it_probes_a_resolver(fixture):
    """A static program relocates its IFUNCs in its start-up code, after the entry point where
    pyprobes places its probes: the probe is on the resolver, and a note says so."""
    try:
        exe = fixture("eng_ifunc", "-static")
    except RuntimeError as e:
        pytest.skip(f"no static libc: {e}")
    r = cli("count", "--json", "ifunc_pick", "--", str(exe), str(N))
    assert r.returncode == 0, r.stderr
    assert "pyprobes: ifunc_pick is an IFUNC and is not resolved yet: probing its resolver" in r.stderr
    assert _rows(r.stderr)[f"{exe.name}:ifunc_pick"]["hits"] == 1


def test_a_never_hit_boostable_probe_is_boosted_everywhere(procs, fixture):
    exe = fixture("eng_ifunc")
    (listed,) = pyprobes.functions_of_binary(str(exe), "never_hit")
    assert listed.probe == "boosted"
    assert "boosted" in cli("list", str(exe), "never_hit").stdout

    run = procs.spawn(exe, N)
    p = run.proc.probe("never_hit")
    assert p.mode == "boosted"
    assert run.finish() == 0
    assert (p.hits, p.mode) == (0, "boosted")

    r = cli("count", "--no-optimize", "--json", "never_hit", "--", str(exe), str(N))
    assert r.returncode == 0, r.stderr
    assert _rows(r.stderr)[f"{exe.name}:never_hit"] | {"address": None} == {
        "probe": f"{exe.name}:never_hit", "module": exe.name, "address": None, "hits": 0, "missed": 0,
        "mode": "boosted"}
    r = cli("count", "--no-optimize", "-v", "never_hit", "--", str(exe), str(N))
    (row,) = [line for line in r.stderr.splitlines() if f"{exe.name}:never_hit" in line and "│" in line]
    assert row.split("│")[3].strip() == "boosted", r.stderr
    assert "lea rax,[rdi+1], boosted" in r.stderr  # -v says the same
