"""USDT probes and typed arguments from the command line: `list --usdt`, `trace` text and
JSON args, `count` on USDT sites, and the one-line errors (no such probe, bad type list)."""
from __future__ import annotations

import json
import os

import pytest

from cli2_util import cli

N = 4


@pytest.fixture(scope="module")
def usdt_exe(build):
    if not (os.path.exists("/usr/include/x86_64-linux-gnu/sys/sdt.h") or os.path.exists("/usr/include/sys/sdt.h")):
        pytest.skip("<sys/sdt.h> is not installed (systemtap-sdt-dev)")
    return build("usdt_probes.c")


def test_list_usdt_binary(usdt_exe):
    r = cli("list", "--usdt", str(usdt_exe))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["MODULE", "ADDRESS", "PROBE", "SEMAPHORE", "ARGUMENTS"]
    rows = {line.split()[2]: line for line in lines[1:]}
    assert set(rows) == {"usdt_fx:tick", "usdt_fx:constant", "usdt_fx:gated"}
    assert rows["usdt_fx:constant"].endswith("-4@$5")
    assert "-8@g_value(%rip)" in rows["usdt_fx:tick"]
    r = cli("list", "--usdt", str(usdt_exe), "g*")
    assert [line.split()[2] for line in r.stdout.splitlines()[1:]] == ["usdt_fx:gated"]


def test_list_usdt_process(procs, usdt_exe):
    run = procs.start(usdt_exe, 1, 1)
    run.wait_output(r"^ready$")
    r = cli("list", "--usdt", "-p", str(run.pid), "usdt_fx:gated")
    assert r.returncode == 0, r.stderr
    (row,) = r.stdout.splitlines()[1:]
    assert row.split()[3] == f"{run.addresses['semaphore']:#x}"  # the runtime address
    run.write("go\n")


def test_trace_usdt_json_args(usdt_exe):
    r = cli("trace", "--json", "usdt:usdt_fx:tick(int,int,uint,str)", "usdt:usdt_fx:gated",
            "--", str(usdt_exe), str(N))
    assert r.returncode == 0, r.stderr
    assert f"ticks calls {N} gated {N} semaphore_after 1" in r.stdout
    hits = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    ticks = [h["args"] for h in hits if h["probe"].endswith("usdt_fx:tick")]
    names = ["alpha", "beta", "gamma"]
    assert ticks == [[i, -i, 1000 + i, names[i % 3], -123456789012, i * 7 - 100] for i in range(N)]
    assert [h["args"] for h in hits if h["probe"].endswith("usdt_fx:gated")] == [[i] for i in range(N)]


def test_trace_function_typed_args_text(usdt_exe):
    r = cli("trace", "work(int,hex)", "--", str(usdt_exe), "2")
    assert r.returncode == 0, r.stderr
    assert "usdt_probes:work(1, \"0xffffffffffffffa3\")" in r.stderr


def test_count_usdt_sites(usdt_exe):
    r = cli("count", "--json", "usdt:usdt_fx:*", "--", str(usdt_exe), str(N))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stderr.strip().splitlines()[-1])
    assert {p["probe"].rsplit(":", 1)[1]: p["hits"] for p in report["probes"]} == \
        {"tick": N, "constant": N, "gated": N}


def one_line_error(result, status: int, *fragments: str) -> None:
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyprobes: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_usdt_errors(usdt_exe):
    one_line_error(cli("trace", "usdt:usdt_fx:tock", "--", str(usdt_exe), "1"), 2,
                   "no USDT probe usdt_fx:tock", "did you mean: usdt_fx:tick")
    one_line_error(cli("trace", "usdt:usdt_fx:tick(int,float)", "--", str(usdt_exe), "1"), 2,
                   "bad type list", "unknown type 'float'")
    one_line_error(cli("trace", "usdt:onlyone", "--", str(usdt_exe), "1"), 2, "bad USDT spec")
    one_line_error(cli("trace", "usdt:usdt_fx:gated(int,int)", "--", str(usdt_exe), "1"), 2,
                   "bad type list", "usdt_fx:gated in usdt_probes has 1 arguments (-4@%edi)")


def test_pending_usdt_in_a_library_loaded_later(build):
    if not (os.path.exists("/usr/include/x86_64-linux-gnu/sys/sdt.h") or os.path.exists("/usr/include/sys/sdt.h")):
        pytest.skip("<sys/sdt.h> is not installed (systemtap-sdt-dev)")
    lib = build("usdt_lib.c", "-shared", "-fPIC", output="libusdt_lib.so")
    exe = build("usdt_dlopen.c", "-ldl")
    r = cli("trace", "--json", "usdt:libusdt_lib:usdt_lib:ping(int)", "--", str(exe), str(lib), str(N))
    assert r.returncode == 0, r.stderr
    assert f"pings calls {N} fired {N}" in r.stdout  # the semaphore was raised in the new library
    hits = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert [h["args"] for h in hits] == [[i] for i in range(N)]
    assert "pending" in r.stderr


def test_trace_usdt_among_recorded_and_dwarf_probes(usdt_exe):
    # Merged with DWARF arguments and records: a USDT probe stays a breakpoint (it reads its
    # note's arguments at a stop) while, with --raw, `work` is recorded in the process.
    r = cli("trace", "--json", "--raw", "usdt:usdt_fx:gated", "work", "--", str(usdt_exe), str(N))
    assert r.returncode == 0, r.stderr
    hits = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert [h["args"] for h in hits if h["probe"].endswith("usdt_fx:gated")] == [[i] for i in range(N)]
    assert [h["args"][0] for h in hits if h["probe"].endswith(":work")] == list(range(N))
    # Without --raw `work` is typed by its DWARF, a type list wins over it.
    r = cli("trace", "--json", "work", "--", str(usdt_exe), "1")
    (hit,) = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert hit["args"] == {"i": 0, "scratch": -100}
    r = cli("trace", "--json", "work(hex)", "--", str(usdt_exe), "1")
    (hit,) = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert hit["args"] == ["0x0"]


def test_trace_usdt_with_stack(usdt_exe):
    r = cli("trace", "--json", "--stack", "usdt:usdt_fx:gated", "--", str(usdt_exe), "2")
    assert r.returncode == 0, r.stderr
    hits = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert [h["args"] for h in hits] == [[0], [1]]
    for h in hits:
        assert ":gated+" in h["stack"][0] and any(":main+" in f for f in h["stack"]), h["stack"]


def test_list_usdt_and_args_are_exclusive(usdt_exe):
    one_line_error(cli("list", "--usdt", "--args", str(usdt_exe)), 2, "--usdt and --args")
    r = cli("list", "--args", str(usdt_exe), "work")
    assert r.returncode == 0, r.stderr
    assert "work" in r.stdout and "scratch" in r.stdout
