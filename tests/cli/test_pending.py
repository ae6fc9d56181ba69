"""Pending probes: a library the program dlopens after start is probed the moment the loader
maps it (its r_brk), dropped cleanly at dlclose, and probed again when it comes back."""
from __future__ import annotations

import subprocess

import pytest

import pyprobes
from cli2_util import by_symbol, build_library, cli, json_lines, last_json, notes

MASK = (1 << 64) - 1


@pytest.fixture(scope="module")
def plug(build):
    return build_library(build, "cli2_plug.c", "libcli2plug.so")


@pytest.fixture(scope="module")
def loader(build):
    return build("cli2_dlopen.c")


def unprobed(*argv) -> str:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_count_equals_the_fixtures_own_counts_across_dlopen_and_dlclose(plug, loader):
    n, rounds = 40, 3
    r = cli("count", "--json", "libcli2plug:plug_fn", "libcli2plug:plug_g*", "main_fn", "--",
            str(loader), str(plug), str(n), str(rounds))
    assert r.returncode == 0, r.stderr
    total = n * rounds * (rounds + 1) // 2
    # The fixture's own counts: every dlclose really unloaded the library, and nothing crashed.
    assert r.stdout.startswith(f"plug_fn={total} main_fn={rounds} unloaded={rounds} ")
    assert r.stdout == unprobed(loader, plug, n, rounds)  # its output is unchanged
    report = last_json(r.stderr)
    rows = by_symbol(report)
    assert rows["plug_fn"]["hits"] == total
    assert rows["plug_g1"]["hits"] == rows["plug_g2"]["hits"] == rounds * (rounds + 1) // 2
    assert rows["main_fn"]["hits"] == rounds
    for name in ("plug_fn", "plug_g1", "plug_g2"):
        # Last seen unloaded: dropped with the library, its hits over every load kept.
        assert rows[name]["mode"] == "unloaded" and rows[name]["module"] == "libcli2plug.so"
        assert rows[name]["missed"] == 0
    assert rows["main_fn"]["mode"] in ("optimized", "boosted", "emulated", "stepped")
    assert report["exit_code"] == 0
    pending_notes = [x for x in notes(r.stderr) if "is pending" in x]
    assert len(pending_notes) == 2 and all("module 'libcli2plug' is not loaded yet" in x for x in pending_notes)


def test_verbose_says_when_armed_and_dropped(plug, loader):
    r = cli("count", "-v", "--json", "libcli2plug:plug_fn", "--", str(loader), str(plug), "3", "2")
    assert r.returncode == 0, r.stderr
    lines = notes(r.stderr)
    armed = [x for x in lines if "libcli2plug:plug_fn -> libcli2plug.so:plug_fn at 0x" in x]
    dropped = [x for x in lines if "libcli2plug.so was unloaded; its probes were dropped" in x]
    assert len(armed) == 2 and len(dropped) == 2  # one of each per dlopen/dlclose
    assert by_symbol(last_json(r.stderr))["plug_fn"]["hits"] == 3 + 6


def test_return_values_of_a_dlopened_function(plug, loader):
    n = 5
    r = cli("trace", "--json", "--raw", "libcli2plug:plug_fn", "libcli2plug:plug_fn%return", "--",
            str(loader), str(plug), str(n), "1")
    assert r.returncode == 0, r.stderr
    hits = json_lines(r.stderr)
    calls = [h["args"][0] for h in hits if h["probe"] == "libcli2plug.so:plug_fn"]
    returns = [h["retval"] for h in hits if h["probe"] == "libcli2plug.so:plug_fn%return"]
    assert calls == list(range(n))
    assert returns == [(3 * i - 7) & MASK for i in range(n)]
    # Each call is followed by its own return.
    order = [h["probe"].endswith("%return") for h in hits]
    assert order == [False, True] * n


def test_a_pending_probe_armed_in_a_process_attached_to(plug, loader):
    fx = subprocess.Popen([str(loader), str(plug), "25", "2", "1500"], stdout=subprocess.PIPE, text=True)
    try:
        assert fx.stdout.readline() == "ready\n"
        r = cli("count", "--json", "-p", str(fx.pid), "libcli2plug:plug_fn", timeout=30)
        assert r.returncode == 0, r.stderr
        report = last_json(r.stderr)
        assert report["exit_code"] is None
        assert by_symbol(report)["plug_fn"]["hits"] == 25 + 50
        out, _ = fx.communicate(timeout=10)
        assert out.startswith("plug_fn=75 main_fn=2 unloaded=2 ")
        assert fx.returncode == 0
    finally:
        if fx.poll() is None:
            fx.kill()
            fx.wait()


def test_api_pending_probe_states(plug, loader):
    with pyprobes.spawn([str(loader), str(plug), "4", "2"]) as proc:
        events = []
        pp = proc.probe("libcli2plug:plug_fn", pending=True)
        rp = proc.return_probe("libcli2plug:plug_fn%return", pending=True,
                               handler=lambda tid, value, ns, data: events.append(value.signed))
        proc.pending_probes.on_change = lambda what, p, detail: events.append((what, p.spec if p else None))
        assert pp.state == rp.state == "pending" and pp.mode == "pending" and pp.probes == []
        code = proc.run()
    assert code == 0
    assert pp.state == "unloaded" and pp.hits == 4 + 8 and len(pp.history) == 2
    assert rp.hits == 12 and all(p.removed for p in pp.history)
    values = [e for e in events if isinstance(e, int)]
    assert values == [3 * i - 7 for i in range(4)] + [3 * i - 7 for i in range(8)]
    kinds = [e[0] for e in events if isinstance(e, tuple) and e[1] == "libcli2plug:plug_fn"]
    assert kinds == ["armed", "unloaded", "armed", "unloaded"]


def test_armed_and_dropped_while_threads_run_probed_code(build, plug):
    exe = build("cli2_dlthreads.c", "-pthread")
    rounds = 20
    r = cli("count", "--json", "libcli2plug:plug_fn", "libcli2plug:plug_fn%return", "spin_fn", "--",
            str(exe), str(plug), str(rounds))
    assert r.returncode == 0, r.stderr
    own = dict(kv.split("=") for kv in r.stdout.split())
    assert int(own["plug_fn"]) == 100 * rounds
    rows = by_symbol(last_json(r.stderr))
    assert rows["plug_fn"]["hits"] == rows["plug_fn%return"]["hits"] == 100 * rounds
    assert rows["spin_fn"]["hits"] == int(own["spin_fn"]) > 0
    assert all(row["missed"] == 0 for row in rows.values())


def test_a_pending_probe_whose_library_never_loads_says_so(loader):
    """The fixture runs 0 rounds (never dlopens): the report's row says pending, and a note
    says the module never came, instead of a silent 0."""
    r = cli("count", "--json", "libnever:fn", "main_fn", "--", str(loader), "/nonexistent/libnever.so", "1", "0")
    assert r.returncode == 0, r.stderr
    rows = {row["probe"]: row for row in last_json(r.stderr)["probes"]}
    assert rows["libnever:fn"]["mode"] == "pending" and rows["libnever:fn"]["hits"] == 0
    assert any(x.endswith("libnever:fn: module 'libnever' was never loaded: nothing was probed")
               for x in notes(r.stderr)), r.stderr
