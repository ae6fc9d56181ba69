"""`trace` with DWARF: a real -O2 -g program's arguments by name and type, checked field by
field against the values main() passes (tests/fixtures/dwarf_args.c); typed return values;
`list --args`; and a build without -g, which says so once and shows raw registers."""
from __future__ import annotations

import pytest

from cli2_util import cli, json_lines, notes

PROBES = ["open_file", "store", "mix", "area", "half", "twice", "lerp", "lerp%return", "many", "half%return", "twice%return", "mix%return"]


@pytest.fixture(scope="module")
def optimised(build):
    return build("dwarf_args.c", "-O2", output="dwarf_args_o2")


@pytest.fixture(scope="module")
def plain(build):
    return build("dwarf_args.c", "-O2", "-g0", output="dwarf_args_nodebug")


def hits_of(stderr: str) -> dict[str, list]:
    by_probe: dict[str, list] = {}
    for h in json_lines(stderr):
        by_probe.setdefault(h["probe"].split(":", 1)[1], []).append(h)
    return by_probe


def test_json_args_are_named_and_typed(optimised):
    r = cli("trace", "--json", *PROBES, "--", str(optimised), "x")
    assert r.returncode == 0, r.stderr
    assert notes(r.stderr) == []
    hits = hits_of(r.stderr)
    opens = [h["args"] for h in hits["open_file"]]
    assert opens[:3] == [{"path": "/etc/hosts", "flags": i} for i in range(3)]
    assert opens[3] == {"path": "x" * 256 + "...", "flags": 300}  # bounded at 256 bytes, marked as cut
    assert [h["args"] for h in hits["store"]] == [{"key": "alpha", "n": 1, "w": 0.5}] * 3
    assert [h["args"] for h in hits["mix"]] == [{"u": 4000000000, "c": 123456789012, "b": True, "ch": ord("Z")}] * 3
    for h in hits["area"]:
        assert set(h["args"]) == {"p", "c", "scale"}
        assert h["args"]["p"] > 0 and h["args"]["c"] == 7 and h["args"]["scale"] == 1.5
    assert [h["args"] for h in hits["half"]] == [{"d": -3.25}] * 3
    assert [h["args"] for h in hits["twice"]] == [{"a": -42, "b": 1 << 40}] * 3
    assert [h["args"] for h in hits["lerp"]] == [{"a": 2.0, "b": 1e10, "t": 0.25}] * 3  # xmm0, xmm1, xmm2
    assert [h["retval"] for h in hits["lerp%return"]] == [2.0 + (1e10 - 2.0) * 0.25] * 3
    assert [h["retval"] for h in hits["half%return"]] == [-1.625] * 3
    # the 7th and 8th arguments are on the stack (DW_OP_fbreg from the CFA), the 8th a short
    assert [h["args"] for h in hits["many"]] == [{f"a{i}": i for i in range(1, 7)} | {"a7": -7, "a8": -8}] * 3
    assert [h["retval"] for h in hits["twice%return"]] == [-84] * 3
    assert [h["retval"] for h in hits["mix%return"]] == [(4000000000 + 123456789012 + 1 + 90) & 0xFFFFFFFF] * 3


def test_text_lines_read_like_calls(optimised):
    r = cli("trace", "open_file", "store", "mix", "half%return", "--", str(optimised))
    assert r.returncode == 0, r.stderr
    lines = [x.split(None, 2)[2] for x in r.stderr.splitlines() if ":" in x and not x.startswith("pyprobes")]
    assert 'dwarf_args_o2:open_file(path="/etc/hosts", flags=0)' in lines
    assert 'dwarf_args_o2:store(key="alpha", n=1, w=0.5)' in lines
    assert "dwarf_args_o2:mix(u=4000000000, c=123456789012, b=true, ch=90 'Z')" in lines
    assert any(x.startswith("dwarf_args_o2:half%return = -1.625 (") for x in lines)
    assert f'dwarf_args_o2:open_file(path="{"x" * 256}"..., flags=300)' in lines


def test_unoptimised_build_reads_the_registers_before_the_prologue(build):
    """At -O0 the debug info puts every parameter in its frame slot, which the prologue has not
    written at the entry pc: the values still come from the calling convention's registers."""
    o0 = build("dwarf_args.c", "-O0", output="dwarf_args_o0")
    r = cli("trace", "--json", "store", "mix", "twice", "--", str(o0))
    assert r.returncode == 0, r.stderr
    hits = hits_of(r.stderr)
    assert [h["args"] for h in hits["store"]] == [{"key": "alpha", "n": 1, "w": 0.5}]
    assert [h["args"] for h in hits["mix"]] == [{"u": 4000000000, "c": 123456789012, "b": True, "ch": ord("Z")}]
    assert [h["args"] for h in hits["twice"]] == [{"a": -42, "b": 1 << 40}]


def test_without_debug_info_says_so_once_and_shows_registers(plain):
    r = cli("trace", "--json", "open_file", "store", "--", str(plain))
    assert r.returncode == 0, r.stderr
    said = [n for n in notes(r.stderr) if "no debug info" in n]
    assert len(said) == 1 and "-dbg" in said[0] and "-g" in said[0]
    hits = hits_of(r.stderr)
    assert [h["args"][1] for h in hits["open_file"]] == [0, 300]  # rsi, raw
    assert all(isinstance(h["args"], list) and len(h["args"]) == 3 for h in hits["store"])


def test_raw_keeps_the_registers(optimised):
    r = cli("trace", "--json", "--raw", "twice", "--", str(optimised))
    assert r.returncode == 0, r.stderr
    assert [h["args"][:2] for h in json_lines(r.stderr)] == [[(-42) & (1 << 64) - 1, 1 << 40]]


def test_list_args_shows_signatures(optimised, plain):
    r = cli("list", "--args", str(optimised))
    assert r.returncode == 0, r.stderr
    sigs = {line.split(None, 1)[1] for line in r.stdout.splitlines()}
    assert "int open_file(const char *path, int flags)" in sigs
    assert "long int store(const char *key, long int n, double w)" in sigs
    assert "long int area(const struct point *p, enum color c, float scale)" in sigs
    r = cli("list", "--args", str(optimised), "st*")
    assert [line.split(None, 1)[1] for line in r.stdout.splitlines()] == [
        "long int store(const char *key, long int n, double w)"]
    r = cli("list", "--args", str(plain))
    assert r.returncode == 1 and "has no debug info" in r.stderr and "-dbg" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
