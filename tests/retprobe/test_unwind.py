"""Unwinding through probed frames: a C++ exception thrown through three probed frames and
caught above them, and pthread_exit()'s forced unwind.

The unwinder reads return addresses to find each frame's unwind info; one that meets a
trampoline address finds none and calls std::terminate. The engine probes
_Unwind_RaiseException (and _Unwind_ForcedUnwind, _Unwind_Resume_or_Rethrow) in libgcc_s and
writes the thread's hijacked return addresses back there, dropping their entries.

Three ways of getting the probes in, all tested:
- attach to the running fixture (it waits on stdin after printing "ready"): libgcc_s is loaded
  when return_probe() runs, so the unwinder is probed at once;
- spawn, run to main, then place the return probes. proc.stop() alone only makes run() return:
  the thread that hit main goes on running while the probes are placed (a short program can be
  finished by then), so the pre-handler also holds the thread (tracee.hold) until they are in;
- spawn and place them at the exec stop, before the loader has mapped libstdc++/libgcc_s:
  ReturnProbes then watches the loader's _dl_debug_state hook and probes the unwinder as soon as
  it is mapped.
"""
from __future__ import annotations

import re

import pytest

N = 300
NAMES = ("t1", "t2", "t3", "note")


def expected(n: int) -> dict[str, int]:
    total = returned = rethrown = notes = throws = 0
    for i in range(n):
        v = i + 2
        notes += i + 1  # t2(i + 1)'s Guard
        if v % 3:
            total += 2 * v + 2
            returned += 1
        else:
            throws += 1
            if v % 2 == 0:
                total += 100 * v
                rethrown += 1
            else:
                total -= v
                returned += 1
    return {"sum": total, "returned": returned, "rethrown": rethrown, "notes": notes, "throws": throws}


def _place(proc, values):
    def handler(name):
        return lambda tid, v, ns, x: values.append((name, x, v.signed))

    return {name: proc.return_probe(name, handler(name), entry=lambda tid, regs: regs.rdi) for name in NAMES}


def _check(run, rps, values, returns):
    want = expected(N)
    m = re.search(r"^result sum (-?\d+) returned (\d+) rethrown (\d+) notes (\d+)$", run.text, re.M)
    assert m, run.text
    assert tuple(map(int, m.groups())) == (want["sum"], want["returned"], want["rethrown"], want["notes"])
    throws, normal = want["throws"], N - want["throws"]
    # Frames the exception went through are dropped, never reported; the rest report their value.
    for name in ("t1", "t2", "t3"):
        assert (rps[name].hits, rps[name].missed, rps[name].dropped) == (normal, 0, throws), rps[name]
    # note() runs from t2's Guard, on the unwinding path too: every call returns and is reported.
    assert (rps["note"].hits, rps["note"].missed, rps["note"].dropped) == (N, 0, 0)
    assert returns.restored_for_unwind == 3 * throws
    got = {}
    for name, x, v in values:
        got.setdefault(name, []).append((x, v))
    ok = [i for i in range(N) if (i + 2) % 3]
    assert got["t3"] == [(i + 2, 2 * (i + 2)) for i in ok]
    assert got["t2"] == [(i + 1, 2 * (i + 2) + 1) for i in ok]
    assert got["t1"] == [(i, 2 * (i + 2) + 2) for i in ok]
    assert got["note"] == [(i + 1, i + 1 + 1000) for i in range(N)]
    assert not returns.stacks.get(run.pid)


def test_throw_through_probed_frames_attached(procs, fixture):
    run = procs.start(fixture("ret_throw.cpp"), N, "wait")
    run.wait_output("^ready$")
    proc = procs.attach(run)
    values = []
    rps = _place(proc, values)
    names = {p.name.split(":")[1] for p in proc.engine.returns._unwind_probes}
    assert "_Unwind_RaiseException" in names  # probed at once: libgcc_s is loaded
    run.write(b"go\n")
    assert proc.run() == 0, run.text  # not -SIGABRT: no std::terminate
    _check(run, rps, values, proc.engine.returns)


def test_throw_through_probed_frames_placed_at_main(procs, fixture):
    run = procs.spawn(fixture("ret_throw.cpp"), N)
    proc = run.proc

    def at_main(tid, regs):
        proc.tracee.hold(tid)  # stop() alone would let it run on while the probes go in
        proc.stop()

    main = proc.probe("main", pre=at_main)
    assert proc.run() is None
    assert main.hits == 1 and run.text == ""
    main.remove()
    values = []
    rps = _place(proc, values)
    assert proc.engine.returns._unwind_probes
    proc.tracee.release(proc.pid)
    assert proc.run() == 0, run.text
    _check(run, rps, values, proc.engine.returns)


def test_throw_through_probed_frames_placed_at_exec(procs, fixture):
    run = procs.spawn(fixture("ret_throw.cpp"), N)
    proc = run.proc
    values = []
    rps = _place(proc, values)
    assert proc.engine.returns._unwind_probes == []  # libgcc_s is not mapped yet at the exec stop
    assert proc.run() == 0, run.text
    names = {p.name.split(":")[1] for p in proc.engine.returns._unwind_probes}
    assert "_Unwind_RaiseException" in names
    _check(run, rps, values, proc.engine.returns)


def test_pthread_exit_unwinds_through_probed_frames(procs, fixture):
    """glibc's pthread_exit unwinds the thread (forced unwind, libgcc_s dlopened at the first
    call, long after the probes were placed at the exec stop): the cleanup handler in the outer
    probed frame must run, which needs the hijacked return addresses back before the unwind."""
    threads = 3
    run = procs.spawn(fixture("ret_pthread_exit", "-fexceptions"), threads)
    proc = run.proc
    rps = [proc.return_probe(name, None) for name in ("inner", "outer")]
    assert proc.run() == 0, run.text
    assert run.text.splitlines() == [f"thread {k} exit {100 + k} cleanups 1" for k in range(threads)] + ["done"]
    # per thread: 3 calls of each return, the 4th is left by pthread_exit (dropped)
    assert [(rp.hits, rp.missed, rp.dropped) for rp in rps] == [(3 * threads, 0, threads)] * 2
    assert proc.engine.returns.restored_for_unwind == 2 * threads
    forced = [p for p in proc.engine.returns._unwind_probes if p.name.endswith(":_Unwind_ForcedUnwind")]
    assert sum(p.hits for p in forced) >= threads
