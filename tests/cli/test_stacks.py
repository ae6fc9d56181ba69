"""trace --stack, count --stacks and count --folded on an -O2 -fomit-frame-pointer program."""
from __future__ import annotations

import json

import pytest

from cli2_util import cli, json_lines, last_json


@pytest.fixture(scope="module")
def chain(build):
    return build("stk_chain.c", "-O2", "-fomit-frame-pointer", output="stk_chain_o2")


def test_trace_stack_lines_and_json(chain):
    r = cli("trace", "--stack", "--args", "1", "stk_c", "--", str(chain), "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "done 2\n"
    frames = [line.split()[1] for line in r.stderr.splitlines() if line.strip().startswith("#")]
    assert frames[0] == "stk_chain_o2:stk_c"
    assert [f.split(":")[1].split("+")[0] for f in frames[:4]] == ["stk_c", "stk_b", "stk_a", "main"]
    half = len(frames) // 2
    assert len(frames) == 2 * half and frames[:half] == frames[half:]  # two hits, the same stack
    r = cli("trace", "--json", "--stack", "stk_c", "--", str(chain), "2")
    hits = json_lines(r.stderr)
    assert len(hits) == 2
    assert [f.split(":")[1].split("+")[0] for f in hits[0]["stack"][:4]] == ["stk_c", "stk_b", "stk_a", "main"]


def test_count_stacks_json_and_mode(chain):
    r = cli("count", "--json", "--stacks", "stk_c", "stk_b", "--", str(chain), "5")
    assert r.returncode == 0, r.stderr
    rows = {row["probe"].split(":")[1]: row for row in last_json(r.stderr)["probes"]}
    for name in ("stk_c", "stk_b"):
        row = rows[name]
        assert row["hits"] == 5 and row["mode"].endswith("+stack")  # a breakpoint, never optimised
        assert sum(s["count"] for s in row["stacks"]) == 5
        assert row["stacks"][0]["frames"][0].endswith(":" + name)


def test_folded_counts_equal_hits(chain, tmp_path):
    out = tmp_path / "out.folded"
    r = cli("count", "--folded", "-o", str(out), "stk_c", "stk_a", "--", str(chain), "7")
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines and all(" " in line for line in lines)
    counts = {}
    for line in lines:
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        counts[frames[-1].split(":")[1]] = counts.get(frames[-1].split(":")[1], 0) + int(n)
        assert "+0x" not in frames[-1]
    assert counts == {"stk_c": 7, "stk_a": 7}
    r = cli("count", "--json", "stk_c", "stk_a", "--", str(chain), "7")
    hits = {row["probe"].split(":")[1]: row["hits"] for row in last_json(r.stderr)["probes"]}
    assert hits == counts


def test_stack_under_a_return_probe(chain):
    # stk_b's return address is the return probe's trampoline while stk_c runs: the stack
    # shows the caller it stands for, and goes on to main
    r = cli("trace", "--stack", "--args", "0", "stk_c", "stk_b%return", "--", str(chain), "1")
    assert r.returncode == 0, r.stderr
    frames = [line.split()[1] for line in r.stderr.splitlines() if line.strip().startswith("#")]
    assert [f.split(":")[1].split("+")[0] for f in frames[:4]] == ["stk_c", "stk_b", "stk_a", "main"]
    assert frames[-1].split(":")[1].startswith("_start")


def test_folded_in_a_library_loaded_and_unloaded(build):
    # the library is dlopened, dlclosed and dlopened again (maybe elsewhere): each round's
    # stacks name it and its caller, and the counts still equal the hits
    lib = build("cli2_plug.c", "-shared", "-fPIC", output="libcli2plug.so")
    prog = build("cli2_dlopen.c")
    r = cli("count", "--folded", "libcli2plug:plug_fn", "--", str(prog), str(lib), "2", "3")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if not x.startswith("pyprobes:")]
    total = 0
    for line in lines:
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        assert frames[-1] == "libcli2plug.so:plug_fn" and frames[-2] == "cli2_dlopen:main", line
        total += int(n)
    assert total == 2 * (1 + 2 + 3)
