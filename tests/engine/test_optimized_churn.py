"""Jump-optimised probes under change (issue 11): removal and 200 optimise/unoptimise rounds
while 8 threads hammer, trampolines collected as garbage; fork, detach and the tracer's death
with optimised probes (opt_count.c)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from processes import maps, text_differences

from .conftest import function_bytes

THREADS = 8
ROUNDS = 200


def our_pages(proc) -> set[int]:
    """Every trampoline and counter page the optimizer mapped."""
    counters = proc.engine.optimizer.host.counters
    return set(counters) | set(counters.values())


def test_remove_and_churn_while_threads_hammer(procs, fixture):
    exe = fixture("opt_count")
    run = procs.spawn(exe, 0, THREADS, stdin_pipe=True)
    proc = run.proc
    lea = proc.probe("opt_lea", action="count")
    run.run_until(r"^ready")
    assert lea.mode == "optimized"
    proc.run(timeout=0.2)
    lea.remove()  # while the threads run: unpatched under a freeze, its trampoline garbage
    assert lea.hits > 0 and lea.mode != "optimized"
    cache = proc.trampolines
    assert cache.stats()["garbage"] == 1
    pushes = []
    pages = 0
    for _ in range(ROUNDS):
        push = proc.probe("opt_push", action="count")
        proc.run(timeout=0.002)  # optimised as run() starts
        assert push.mode == "optimized", push.not_optimized
        push.remove()
        pushes.append(push.hits)
        pages = max(pages, cache.stats()["pages"])
    stats = cache.stats()
    assert stats["collections"] >= ROUNDS // cache.slots_per_page
    assert pages <= 2 and stats["slots_used"] == 0
    assert proc.engine.optimizer.stats["unoptimized"] == ROUNDS + 1
    proc.detach()
    assert text_differences(run.pid, exe) == []
    run.close_stdin()
    assert run.wait_exit() == 0, run.text
    calls = run.results[("calls",)]
    assert calls["bad"] == 0 and run.results[()]["sigtrap"] == 0
    assert lea.hits <= calls["lea"]
    assert 0 < sum(pushes) <= calls["push"]


def test_fork_while_optimized(procs, fixture):
    """The child runs the original code (its text scrubbed) and counts right; the parent's
    counts are its own calls only."""
    exe = fixture("opt_count")
    run = procs.spawn(exe, 20_000, 4, "fork")
    proc = run.proc
    lea = proc.probe("opt_lea", action="count")
    assert run.finish() == 0, run.text
    assert lea.mode == "optimized"
    calls = run.results[("calls",)]
    assert lea.hits == calls["lea"] == 80_000
    child = run.results[("child",)]
    assert child["lea"] == 20_000 and child["bad"] == 0 and run.results[()]["child_status"] == 0
    _, original = function_bytes(exe, "opt_lea")
    assert run.lines("child")[0].split()[-1] == original[:8].hex()


def test_detach_leaves_text_and_maps_as_they_were(procs, fixture):
    exe = fixture("opt_count")
    run = procs.spawn(exe, 0, 4, stdin_pipe=True)
    proc = run.proc
    probes = [proc.probe(name, action="count") for name in ("opt_lea", "opt_push")]
    run.run_until(r"^ready")
    proc.run(timeout=0.1)
    assert [p.mode for p in probes] == ["optimized", "optimized"]
    pages = our_pages(proc)
    assert len(pages) == 2
    assert text_differences(run.pid, exe) != []  # the jmps
    proc.detach()
    assert all(p.hits > 0 for p in probes)
    assert text_differences(run.pid, exe) == []
    assert not pages & {start for start, _, _, _ in maps(run.pid)}
    run.close_stdin()
    assert run.wait_exit() == 0, run.text
    assert run.results[("calls",)]["bad"] == 0 and run.results[()]["sigtrap"] == 0


TRACER = """
import sys, pyprobes
proc = pyprobes.attach(int(sys.argv[1]))
probes = [proc.probe(name, action="count") for name in ("opt_lea", "opt_push")]
while not all(p.hits for p in probes):
    proc.run(timeout=0.05)
print(*[p.mode for p in probes], flush=True)
proc.run()
"""


def test_tracer_killed_with_only_optimized_probes(procs, fixture):
    """SIGKILL to the tracer mid-run: no int3 is left, so the program finishes correctly. (A
    process pyprobes spawned dies with it, PTRACE_O_EXITKILL: this one is attached to.)"""
    exe = fixture("opt_count")
    run = procs.start(exe, 0, 4)
    run.wait_output(r"^ready")
    tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(run.pid)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().split() == ["optimized", "optimized"]
        time.sleep(0.1)  # the threads hammer the trampolines meanwhile
        tracer.send_signal(signal.SIGKILL)
        tracer.wait()
        run.close_stdin()
        assert run.wait_exit() == 0, run.text
        assert run.results[("calls",)]["bad"] == 0 and run.results[()]["sigtrap"] == 0
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()


def test_exec_forgets_optimized_probes(procs, fixture):
    """After an exec the new image holds none of our bytes: it runs unprobed and right; the
    probe keeps the hits of the first image."""
    exe = fixture("opt_count")
    run = procs.spawn(exe, 20_000, 2, "exec")
    proc = run.proc
    lea = proc.probe("opt_lea", action="count")
    assert run.finish() == 0, run.text
    first, second = run.lines("calls")
    assert first == second == "calls lea 40000 push 40000 jmp 400 red 40000 bad 0"
    assert run.lines("sigtrap") == ["sigtrap 0", "sigtrap 0"]
    assert lea.hits == 40_000 and lea.removed
    assert proc.trampolines.stats()["pages"] == 0


def test_disable_and_enable(procs, fixture):
    """Disabling unoptimises (its counts stop); enabling queues it again for the next run()."""
    exe = fixture("opt_count")
    run = procs.spawn(exe, 0, 2, stdin_pipe=True)
    proc = run.proc
    lea = proc.probe("opt_lea", action="count")
    run.run_until(r"^ready")
    proc.run(timeout=0.05)
    assert lea.mode == "optimized"
    lea.disable()
    assert lea.mode != "optimized"
    before = lea.hits
    proc.run(timeout=0.05)
    assert lea.hits == before
    lea.enable()
    proc.run(timeout=0.05)
    assert lea.mode == "optimized" and lea.hits > before
    proc.detach()
    run.close_stdin()
    assert run.wait_exit() == 0, run.text
    assert lea.hits < run.results[("calls",)]["lea"]
