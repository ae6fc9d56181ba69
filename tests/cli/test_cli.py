"""The command line end to end: real fixtures, through `python -m pyprobes` in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyprobes.symbols import ElfFile, main_module, modules

FIXTURE = "cli_target.c"
CLI = [sys.executable, "-m", "pyprobes"]


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def expected_output(n: int) -> str:
    return f"cli_add={n} getppid={n} sum={3 * n * (n - 1) // 2 + 4662 * n}\n"


def last_json(stderr: str) -> dict:
    return json.loads(stderr.strip().splitlines()[-1])


def by_symbol(report: dict) -> dict[str, dict]:
    return {p["probe"].split(":", 1)[1]: p for p in report["probes"]}


@pytest.fixture(scope="module")
def pie(build):
    return build(FIXTURE)


@pytest.fixture(scope="module")
def nopie(build):
    return build(FIXTURE, "-no-pie", output="cli_target_nopie")


def one_line_error(result: subprocess.CompletedProcess, status: int, *fragments: str) -> str:
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pyprobes: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------- count
@pytest.mark.parametrize("which", ["pie", "nopie"])
def test_count_json_equals_the_fixtures_own_counts(request, which):
    exe = request.getfixturevalue(which)
    n = 1500
    r = cli("count", "--json", "cli_add", "libc:getppid", "--", str(exe), str(n))
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_output(n)  # the command's own output passes through untouched
    report = last_json(r.stderr)
    probes = by_symbol(report)
    assert probes["cli_add"]["hits"] == n
    assert probes["getppid"]["hits"] == n
    assert probes["getppid"]["module"] == "libc.so.6"
    assert all(p["missed"] == 0 for p in report["probes"])
    assert all(p["mode"] in ("optimized", "boosted", "emulated", "stepped") for p in report["probes"])
    assert report["exit_code"] == 0 and report["duration_s"] > 0
    elf = ElfFile.load(str(exe))
    addr = int(probes["cli_add"]["address"], 16)
    if which == "nopie":
        assert addr == elf.lookup("cli_add")[0].address  # link-time address: not relocated
    else:
        assert addr != elf.lookup("cli_add")[0].address


def test_glob_places_one_probe_per_match(pie):
    r = cli("count", "--json", "-v", "cli_glob_*", "--", str(pie), "3")
    assert r.returncode == 0, r.stderr
    probes = by_symbol(last_json(r.stderr))
    assert {k: v["hits"] for k, v in probes.items()} == {"cli_glob_one": 1, "cli_glob_two": 2,
                                                         "cli_glob_three": 3}
    assert "cli_glob_*: 3 probes placed" in r.stderr


def test_count_table_to_file(pie, tmp_path):
    out = tmp_path / "report.txt"
    r = cli("count", "-o", str(out), "cli_add", "--", str(pie), "20")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == expected_output(20)
    text = out.read_text()
    assert "cli_add" in text and "20" in text and "hits" in text


def test_count_interval_reprints(pie):
    r = cli("count", "--json", "-i", "0.2", "cli_add", "--", str(pie), "600", "1000")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stderr.strip().splitlines()]
    assert len(lines) >= 2
    assert all(x.get("final") is False for x in lines[:-1])
    assert by_symbol(lines[-1])["cli_add"]["hits"] == 600


def test_exit_status_of_the_command(pie):
    r = cli("count", "--json", "cli_add", "--", str(pie), "5", "0", "exit:7")
    assert r.returncode == 7
    assert last_json(r.stderr)["exit_code"] == 7


def test_command_killed_by_a_signal(pie):
    r = cli("count", "cli_add", "--", str(pie), "5", "0", "signal")
    assert r.returncode == 128 + signal.SIGUSR1
    assert f"was killed by signal {int(signal.SIGUSR1)} (SIGUSR1)" in r.stderr


# ---------------------------------------------------------------------------------- trace
def test_trace_json_shows_the_arguments(pie):
    r = cli("trace", "--json", "--raw", "cli_add", "--", str(pie), "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_output(5)
    hits = [json.loads(x) for x in r.stderr.strip().splitlines()]
    assert [h["args"] for h in hits] == [[i, i + 1, 0x1234] for i in range(5)]
    assert all(h["probe"].endswith(":cli_add") and h["tid"] > 0 for h in hits)
    times = [h["time_s"] for h in hits]
    assert times == sorted(times) and times[0] >= 0


def test_trace_text_and_args_count(pie):
    r = cli("trace", "--raw", "--args", "2", "cli_add", "--", str(pie), "3")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "cli_add(" in x]
    assert len(lines) == 3
    assert lines[2].endswith("cli_add(0x2, 0x3)")


# ---------------------------------------------------------------------------------- attach
def _text_matches_file(pid: int, names: list[tuple[str, str]]) -> None:
    mods = modules(pid)
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for module, name in names:
            mod = main_module(pid, mods) if module == "main" else next(m for m in mods if m.name.startswith(module))
            sym = mod.elf.lookup(name)[0]
            mem.seek(mod.to_runtime(sym.address))
            assert mem.read(sym.size) == ElfFile.load(mod.path).read_vaddr(sym.address, sym.size), name


# "-usleep": attached while the fixture sleeps in nanosleep (syscall injection and restart).
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "duration", "SIGINT-usleep", "SIGTERM-usleep"])
def test_attach_then_leave_cleanly(pie, how):
    n = 2500  # ~2.5 s: still running after pyprobes leaves, even on a loaded machine
    wait = "sleep:1000" if how.endswith("usleep") else "1000"
    how = how.split("-")[0]
    fx = subprocess.Popen([str(pie), str(n), wait], stdout=subprocess.PIPE, text=True)
    pp = None
    try:
        assert fx.stdout.readline() == "ready\n"
        extra = ["-d", "0.5"] if how == "duration" else ["-i", "0.1"]
        pp = subprocess.Popen([*CLI, "count", "--json", "-v", "-p", str(fx.pid), *extra, "cli_add",
                               "libc:getppid"], stderr=subprocess.PIPE, text=True)
        placed = 0
        while placed < 2:
            line = pp.stderr.readline()
            assert line, "pyprobes ended before placing its probes"
            placed += " -> " in line
        if how != "duration":
            # Signalled once a tick says both probes were hit (not after a sleep that a loaded
            # machine can spend before the first hit).
            while True:
                line = pp.stderr.readline()
                assert line, "pyprobes ended before its probes were hit"
                if line.startswith("{") and all(p["hits"] for p in json.loads(line)["probes"]):
                    break
            pp.send_signal(getattr(signal, how))
        _, err = pp.communicate(timeout=10)
        assert pp.returncode == 0, err
        report = last_json(err)
        assert report["exit_code"] is None
        hits = by_symbol(report)
        assert 0 < hits["cli_add"]["hits"] < n
        assert 0 < hits["getppid"]["hits"] < n
        assert fx.poll() is None, "the fixture should still be running"
        _text_matches_file(fx.pid, [("main", "cli_add"), ("libc", "getppid")])
        out, _ = fx.communicate(timeout=10)
        assert out == expected_output(n)
        assert fx.returncode == 0
    finally:
        for p in (pp, fx):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_ctrl_c_on_a_spawned_command_reaches_it(pie):
    pp = subprocess.Popen([*CLI, "count", "cli_add", "--", str(pie), "100000", "1000"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert pp.stdout.readline() == "ready\n"
        time.sleep(0.2)
        os.killpg(pp.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        _, err = pp.communicate(timeout=10)
        assert pp.returncode == 128 + signal.SIGINT, err
        assert "killed by signal 2 (SIGINT)" in err
        assert "cli_add" in err  # the table is still printed
    finally:
        if pp.poll() is None:
            os.killpg(pp.pid, signal.SIGKILL)
            pp.wait()


# ---------------------------------------------------------------------------------- list
def test_list_binary(pie):
    r = cli("list", str(pie), "cli_*")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[3]: line for line in r.stdout.splitlines()[1:]}
    assert set(rows) == {"cli_add", "cli_glob_one", "cli_glob_two", "cli_glob_three", "cli_refused"}
    assert "refused: syscall" in rows["cli_refused"]
    sym = ElfFile.load(str(pie)).lookup("cli_add")[0]
    assert f"{sym.address:#x}" in rows["cli_add"].split()
    assert rows["cli_add"].split()[4] in ("boosted", "emulated", "stepped")


def test_list_pid_with_module_glob(pie):
    fx = subprocess.Popen([str(pie), "100000", "1000"], stdout=subprocess.PIPE, text=True)
    try:
        assert fx.stdout.readline() == "ready\n"
        r = cli("list", "-p", str(fx.pid), "libc:getppi*")
        assert r.returncode == 0, r.stderr
        (row,) = r.stdout.splitlines()[1:]
        assert row.split()[0] == "libc.so.6" and row.split()[3] == "getppid"
        r = cli("list", "-p", str(fx.pid))
        assert "cli_add" in r.stdout and "libc" not in r.stdout
    finally:
        fx.kill()
        fx.wait()


# ---------------------------------------------------------------------------------- errors
def test_unknown_symbol_with_near_misses(pie):
    one_line_error(cli("count", "cli_ad", "--", str(pie)), 2, "no function 'cli_ad'", "did you mean", "cli_add")


def test_empty_glob_with_near_misses(pie):
    one_line_error(cli("count", "cli_glob_x*", "--", str(pie)), 2, "no functions match", "did you mean")


def test_mid_instruction(pie):
    one_line_error(cli("count", "cli_add+1", "--", str(pie)), 2, "inside the instruction")


def test_refused_instruction(pie):
    one_line_error(cli("trace", "cli_refused", "--", str(pie)), 2, "cannot probe", "syscall")


def test_return_probe_counts_returns(pie):
    r = cli("count", "--json", "cli_add%return", "--", str(pie), "5")
    assert r.returncode == 0, r.stderr
    (row,) = last_json(r.stderr)["probes"]
    assert row["probe"].endswith(":cli_add%return") and row["hits"] == 5 and row["mode"] == "return optimized"


def test_module_not_loaded_is_pending(pie):
    # Never loaded by the fixture: pending to the end, said once, shown as such; the command runs.
    r = cli("count", "--json", "libm:sin", "--", str(pie), "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_output(3)
    assert "module 'libm' is not loaded yet; the probe is pending" in r.stderr
    (row,) = last_json(r.stderr)["probes"]
    assert row == {"probe": "libm:sin", "module": "libm", "address": None, "hits": 0, "missed": 0,
                   "mode": "pending"}


def test_unknown_pid():
    one_line_error(cli("count", "-p", "999999999", "main"), 1, "no process with PID 999999999")


def test_command_not_found():
    one_line_error(cli("count", "main", "--", "no-such-command-pyprobes"), 1, "command not found")


def test_usage_errors(pie):
    one_line_error(cli("count", "main"), 2, "nothing to trace")
    one_line_error(cli("count", "-p", "1", "main", "--", str(pie)), 2, "not both")
    one_line_error(cli("list"), 2, "BINARY")
    one_line_error(cli("list", "/no/such/binary"), 2, "no such file")
    assert cli("count").returncode == 2  # argparse: PROBE is required


def test_a_failed_placement_never_runs_the_command(pie):
    r = cli("count", "cli_ad", "--", str(pie), "5")
    assert r.returncode == 2 and r.stdout == ""


@pytest.mark.parametrize("command", ["list", "trace", "count", "demo"])
def test_help_has_examples(command):
    r = cli(command, "--help")
    assert r.returncode == 0 and "examples:" in r.stdout


# ---------------------------------------------------------------------------------- demo
def test_demo(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    r = subprocess.run([*CLI, "demo"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "demo_work 10000 times" in r.stdout
    assert "exactly the program's own counts" in r.stderr
    for mode in ("boosted", "emulated", "stepped"):
        assert mode in r.stderr


def test_demo_has_one_probe_of_each_kind(tmp_path):
    """As its help says: demo_work emulated (the nops gcc pads its entry with), demo_add
    boosted, demo_tick stepped."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    r = subprocess.run([*CLI, "demo", "--json", "--rounds", "20"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(next(line for line in r.stderr.splitlines() if line.startswith("{")))
    modes = {p["probe"].split(":")[-1]: (p["mode"], p["hits"]) for p in report["probes"]}
    assert modes == {"demo_work": ("emulated", 40), "demo_add": ("boosted", 80),
                     "demo_tick": ("stepped", 4)}
    assert "demo_work starts with a nop" in cli("demo", "--help").stdout


def test_demo_without_gcc(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PATH=str(tmp_path))
    r = subprocess.run([*CLI, "demo"], capture_output=True, text=True, timeout=30, env=env)
    one_line_error(r, 1, "gcc was not found")


def test_verbose_shows_what_was_placed(pie):
    r = cli("count", "-v", "cli_add", "libc:getppi*", "--", str(pie), "3")
    assert r.returncode == 0, r.stderr
    assert "cli_add -> cli_target:cli_add at 0x" in r.stderr
    assert "libc:getppi* -> libc.so.6:getppid at 0x" in r.stderr
