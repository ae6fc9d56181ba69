"""USDT probes in real processes: hits counted against the program's own counts, arguments
from the notes, the semaphore raised while probed and back to its old value after removal and
detach, and Debian's python3.11, whose function__entry fires only while its semaphore is set."""
from __future__ import annotations

import collections
import os
import re
import shutil
import struct
import subprocess

import pytest

from pyprobes import ProbeError

from processes import read_mem

N = 6


@pytest.fixture(scope="module")
def usdt_exe(build):
    if not (os.path.exists("/usr/include/x86_64-linux-gnu/sys/sdt.h") or os.path.exists("/usr/include/sys/sdt.h")):
        pytest.skip("<sys/sdt.h> is not installed (systemtap-sdt-dev)")
    return build("usdt_probes.c")


def _semaphore(pid: int, address: int) -> int:
    return struct.unpack("<H", read_mem(pid, address, 2))[0]


def test_usdt_hits_and_args(procs, usdt_exe):
    run = procs.spawn(usdt_exe, N)
    proc = run.proc
    proc.run_to_entry()
    seen, gated_args = [], []
    tick = proc.probe("usdt:usdt_fx:tick(int,int,uint,str,int,hex)",
                      pre=lambda tid, regs: seen.append((tick.usdt_args(regs), tick.args(tid, regs))))
    const = proc.probe("usdt:usdt_probes:usdt_fx:constant")
    gated = proc.probe("usdt:usdt_fx:gate?", pre=lambda tid, regs: gated_args.append(gated.args(tid, regs)))
    assert tick.mode == "emulated"  # the site is a nop
    assert run.finish() == 0
    res = run.results
    # The semaphore was raised, so the program took the gated branch every time.
    assert res[("ticks",)] == {"calls": N, "gated": N, "semaphore_after": 1}, run.text
    assert (tick.hits, const.hits, gated.hits) == (N, N, N)
    assert gated_args == [[i] for i in range(N)]
    names = ["alpha", "beta", "gamma"]
    for i, (raw, typed) in enumerate(seen):
        assert raw[:3] == [i, -i, 1000 + i] and raw[4:] == [-123456789012, i * 7 - 100]
        assert typed == [i, -i, 1000 + i, names[i % 3], -123456789012, f"0x{(i * 7 - 100) & (2**64 - 1):x}"]


def test_unprobed_semaphore_stays_down(procs, usdt_exe):
    run = procs.spawn(usdt_exe, N)
    run.proc.run_to_entry()
    tick = run.proc.probe("usdt:usdt_fx:tick")
    assert run.finish() == 0
    assert run.results[("ticks",)] == {"calls": N, "gated": 0, "semaphore_after": 0}
    assert tick.hits == N


@pytest.mark.parametrize("start", [0, 3])
def test_semaphore_restored_after_removal_and_detach(procs, usdt_exe, start):
    run = procs.start(usdt_exe, N, 1, start)
    run.wait_output(r"^ready$")
    address = run.addresses["semaphore"]
    proc = procs.attach(run)
    assert _semaphore(run.pid, address) == start
    first = proc.probe("usdt:usdt_fx:gated")
    second = proc.probe("usdt:usdt_fx:gated")
    assert _semaphore(run.pid, address) == start + 2
    first.remove()
    assert _semaphore(run.pid, address) == start + 1
    proc.detach()
    assert _semaphore(run.pid, address) == start
    run.write("go\n")
    assert run.wait_exit() == 0
    want_gated = N if start else 0
    assert run.results[("ticks",)] == {"calls": N, "gated": want_gated, "semaphore_after": start}
    assert second.removed


def test_no_such_usdt_probe(procs, usdt_exe):
    run = procs.spawn(usdt_exe, 1)
    run.proc.run_to_entry()
    with pytest.raises(ProbeError, match=r"no USDT probe usdt_fx:tock.*did you mean: usdt_fx:tick"):
        run.proc.probe("usdt:usdt_fx:tock")
    with pytest.raises(ProbeError, match="no USDT probe .* in libc.so.6 \\(it declares none\\)|no USDT probe"):
        run.proc.probe("usdt:libc:nope:nothing")


PYTHON = "/usr/bin/python3.11"
# Debian's python3.11 reaches its function__entry site only while a trace or profile function
# is set (cframe.use_tracing); bpftrace's usdt: probe sees the same. Generator resumes fire too.
SCRIPT = """\
import sys; sys.setprofile(lambda *a: None)
import collections
calls = collections.Counter()
def leaf(n):
    calls["leaf"] += 1
    return n + 1
def gen(n):
    for i in range(n):
        yield leaf(i)
for i in range(3):
    leaf(i)
list(map(leaf, range(4)))
total = sum(gen(5))
total += sum(x for x in range(2))
print(dict(calls))
"""


def _bpftrace_counts(script) -> dict | None:
    """bpftrace's per-function counts for the script, or None where bpftrace cannot run."""
    if shutil.which("bpftrace") is None or os.geteuid() != 0:
        return None
    prog = (f'usdt:{PYTHON}:python:function__entry /str(arg0) == "{script}"/ '
            '{ @[str(arg1)] = count(); }')
    try:
        out = subprocess.run(["bpftrace", "-e", prog, "-c", f"{PYTHON} -S {script}"],
                             capture_output=True, text=True, timeout=100)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {m[1]: int(m[2]) for m in re.finditer(r"^@\[(.*)\]: (\d+)$", out.stdout, re.M)}


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="no /usr/bin/python3.11")
def test_python_function_entry(procs, tmp_path):
    script = tmp_path / "calls.py"
    script.write_text(SCRIPT)
    run = procs.spawn(PYTHON, "-S", str(script))
    proc = run.proc
    proc.run_to_entry()
    counts = collections.Counter()
    lines = collections.defaultdict(set)

    def on_entry(tid, regs):
        filename, function, line = entry.args(tid, regs)
        if filename == str(script):
            counts[function] += 1
            lines[function].add(line)

    entry = proc.probe("usdt:python:function__entry(str,str,int)", pre=on_entry)
    assert entry.semaphore is not None
    assert run.finish() == 0
    own = eval(run.text.strip().splitlines()[-1])
    assert own == {"leaf": 12}
    # leaf: its own count; gen: one entry and five resumes; the genexpr: two yields and the end.
    assert dict(counts) == {"leaf": 12, "gen": 6, "<genexpr>": 3}
    assert lines["leaf"] == {4}
    reference = _bpftrace_counts(script)
    if reference is not None:
        assert dict(counts) == reference


def test_function_typed_args(procs, usdt_exe):
    """A function without a type list from debug info: str from rdi (cut at 256 bytes and marked),
    double from xmm0, int from rsi (the next integer register: doubles take none)."""
    run = procs.spawn(usdt_exe, 1)
    run.proc.run_to_entry()
    seen = []
    p = run.proc.probe("scale(str,double,int)", pre=lambda tid, regs: seen.append(p.args(tid, regs)))
    assert p.types == ("str", "double", "int")
    assert run.finish() == 0
    long_label = "".join(chr(ord("a") + i % 26) for i in range(256)) + "..."
    assert seen == [["short", 0.5, -3], [long_label, 2.25, 4]]


def test_forked_child_gets_its_semaphore_back(procs, usdt_exe):
    """A forked child is let go untraced with its probes scrubbed; its copy of a semaphore we
    raised goes back down with them."""
    run = procs.spawn(usdt_exe, 2, 0, 0, "fork")
    run.proc.run_to_entry()
    gated = run.proc.probe("usdt:usdt_fx:gated")
    assert run.finish() == 0
    assert run.results[("ticks",)] == {"calls": 2, "gated": 2, "semaphore_after": 1}
    assert run.results[("child",)] == {"semaphore": 0}, run.text
    assert gated.hits == 2
