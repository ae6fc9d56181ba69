"""`%return` on the command line: return values and latency in trace, returns counted in count,
a log2 latency histogram with --latency."""
from __future__ import annotations

import re

import pytest

from cli2_util import by_symbol, cli, json_lines, last_json

MASK = (1 << 64) - 1


def expected(i: int) -> int:
    """What cli2_ret's ret_val(i) returns, as rax holds it."""
    if i % 3 == 0:
        return i * 1000 + 7
    if i % 3 == 1:
        return -i & MASK
    return 0xFEDCBA9876543210 ^ i


@pytest.fixture(scope="module")
def ret(build):
    return build("cli2_ret.c")


def test_trace_json_return_values_are_exact(ret):
    n = 9
    r = cli("trace", "--json", "--raw", "ret_val%return", "--", str(ret), str(n))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"sum={sum(expected(i) + 1 for i in range(n)) & MASK}\n"
    hits = json_lines(r.stderr)
    assert [h["retval"] for h in hits] == [expected(i) for i in range(n)]
    assert all(h["probe"].endswith(":ret_val%return") for h in hits)
    assert all(isinstance(h["latency_ns"], int) and h["latency_ns"] > 0 for h in hits)
    assert all(h["tid"] > 0 for h in hits) and [h["time_s"] for h in hits] == sorted(h["time_s"] for h in hits)


def test_trace_text_calls_and_returns_nest(ret):
    r = cli("trace", "--raw", "--args", "1", "ret_outer", "ret_outer%return", "ret_val%return", "--", str(ret), "2")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if ":ret_" in x]
    shapes = [re.sub(r"^\s*[\d.]+\s+\d+\s+\S+:", "", x) for x in lines]
    assert shapes[0] == "ret_outer(0x0)"
    assert re.fullmatch(r"ret_val%return = 0x7 \(\d+\.\d{3} us\)", shapes[1])
    assert re.fullmatch(r"ret_outer%return = 0x8 \(\d+\.\d{3} us\)", shapes[2])
    assert shapes[3] == "ret_outer(0x1)"
    assert shapes[4].startswith("ret_val%return = 0xffffffffffffffff (")
    assert shapes[5].startswith("ret_outer%return = 0x0 (")
    assert len(shapes) == 6


def test_count_returns(ret):
    r = cli("count", "--json", "ret_val%return", "ret_outer%return", "ret_val", "--", str(ret), "30")
    assert r.returncode == 0, r.stderr
    rows = by_symbol(last_json(r.stderr))
    assert rows["ret_val%return"]["hits"] == rows["ret_outer%return"]["hits"] == rows["ret_val"]["hits"] == 30
    # the count probe on ret_val shares the return probe's entry trampoline: both in the process
    assert rows["ret_val%return"]["mode"] == "return optimized" and rows["ret_val%return"]["missed"] == 0
    assert "latency_ns" not in rows["ret_val%return"]


def test_glob_return_probes(ret):
    r = cli("count", "--json", "ret_*%return", "--", str(ret), "4")
    assert r.returncode == 0, r.stderr
    rows = by_symbol(last_json(r.stderr))
    assert {k: v["hits"] for k, v in rows.items()} == {"ret_val%return": 4, "ret_outer%return": 4}


@pytest.mark.parametrize("flags", [(), ("--no-optimize",)])
def test_latency_histogram_json(ret, flags):
    n = 40
    r = cli("count", "--json", "--latency", *flags, "ret_val%return", "ret_val", "--", str(ret), str(n))
    assert r.returncode == 0, r.stderr
    rows = by_symbol(last_json(r.stderr))
    lat = rows["ret_val%return"]["latency_ns"]
    assert lat["count"] == n == rows["ret_val%return"]["hits"]
    assert sum(b[2] for b in lat["hist"]) == n
    # In the process, pyprobes' own measured cost is subtracted: a call this short may read 0
    # ns (bpftrace's [0] bucket); with stops every latency is well above it.
    assert (0 < lat["min"] if flags else 0 <= lat["min"]) and lat["min"] <= lat["mean"] <= lat["max"]
    for lo, hi, _ in lat["hist"]:
        assert (lo, hi) == (0, 1) or (hi == 2 * lo and lo & (lo - 1) == 0)  # log2 buckets [2^k, 2^(k+1))
    assert lat["hist"][0][0] <= lat["min"] < lat["hist"][0][1]
    assert lat["hist"][-1][0] <= lat["max"] < lat["hist"][-1][1]
    assert "latency_ns" not in rows["ret_val"]  # entry probes have none


def test_latency_histogram_text(ret):
    r = cli("count", "--latency", "ret_val%return", "--", str(ret), "20")
    assert r.returncode == 0, r.stderr
    assert re.search(r"ret_val%return latency \(ns\): 20 calls, min \d+, mean \d+, max \d+", r.stderr)
    # In-process latencies have pyprobes' own measured cost subtracted: a call this short may
    # show as 0 ns (bpftrace's "[0]" row).
    bars = re.findall(r"^\[(\d+[KMG]?)(?:, (\d+[KMG]?)\)|\])\s+(\d+) \|(@*) *\|$", r.stderr, re.M)
    assert bars and sum(int(b[2]) for b in bars) == 20
    assert max(len(b[3]) for b in bars) == 52  # the fullest bucket fills the bar


def test_latency_needs_a_return_probe(ret):
    r = cli("count", "--latency", "ret_val", "--", str(ret), "2")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "pyprobes: --latency needs a return probe (SYMBOL%return)"


def test_return_probe_needs_a_function_entry(ret):
    r = cli("trace", "ret_val+4%return", "--", str(ret), "2")
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("pyprobes: ") and "%return needs a function entry" in line
