"""Return values (int, negative int, pointer, double) and latency, on a real process."""
from __future__ import annotations

import re
import struct


def test_int_pointer_and_double_returns(procs, fixture):
    run = procs.spawn(fixture("ret_values"))
    proc = run.proc
    ints, ptrs, doubles = [], [], []

    def on_int(tid, value, ns, data):
        ints.append((data, int(value), value.signed))

    def on_double(tid, value, ns, data):
        doubles.append((data, value.double, bytes(value.xmm0[:8])))

    r_int = proc.return_probe("ret_int", on_int, entry=lambda tid, regs: regs.rdi)
    r_ptr = proc.return_probe("ret_ptr", lambda tid, v, ns, data: ptrs.append((data, int(v))),
                              entry=lambda tid, regs: regs.rdi & 0xFFFFFFFF)
    # the double argument arrives in xmm0: record it from the program's own output instead
    r_dbl = proc.return_probe("ret_double%return", on_double, entry=lambda tid, regs: tid)
    assert proc.run() == 0, run.text
    assert run.text.endswith("done\n")

    # int: the handler saw the argument (entry data) and x*x - 1000, as the program did
    assert (r_int.hits, r_int.missed, r_int.dropped) == (40, 0, 0)
    program = {int(m[0]): int(m[1]) for m in re.findall(r"^int x (\d+) got (-?\d+)$", run.text, re.M)}
    assert program == {x: x * x - 1000 for x in range(40)}
    assert [d for d, _, _ in ints] == list(range(40))
    for x, raw, signed in ints:
        assert signed == x * x - 1000
        assert raw == signed & 0xFFFF_FFFF_FFFF_FFFF  # rax as an unsigned int

    # pointer: what the handler saw is what the caller printed
    assert (r_ptr.hits, r_ptr.missed, r_ptr.dropped) == (8, 0, 0)
    printed = {int(m[0]): int(m[1], 16) for m in re.findall(r"^ptr i (\d+) got (0x[0-9a-f]+)$", run.text, re.M)}
    assert dict(ptrs) == printed and len(printed) == 8
    base = printed[0]
    assert all(printed[i] == base + i for i in range(8))
    assert base > 0xFFFF_FFFF  # a real (PIE) address, not a small int

    # double: xmm0, bit-for-bit what the program printed
    assert (r_dbl.hits, r_dbl.missed, r_dbl.dropped) == (8, 0, 0)
    got = [float(m) for m in re.findall(r"^double x \d+ got (\S+)$", run.text, re.M)]
    assert got == [(k * 1.75 - 3.0) * 0.5 + 0.25 for k in range(8)]
    assert [d for d, _, _ in doubles] == [proc.pid] * 8
    assert [v for _, v, _ in doubles] == got
    assert [raw for _, _, raw in doubles] == [struct.pack("<d", v) for v in got]


def test_elapsed_time_of_a_10ms_sleep(procs, fixture):
    run = procs.spawn(fixture("ret_values"))
    proc = run.proc
    naps = []
    rp = proc.return_probe("nap", lambda tid, v, ns, data: naps.append((int(v), ns)))
    assert proc.run() == 0, run.text
    assert (rp.hits, rp.missed, rp.dropped) == (3, 0, 0)
    assert [v for v, _ in naps] == [11, 11, 11]
    for _, ns in naps:
        # at least the sleep itself (how close: python -m bench.retprobe_latency)
        assert ns >= 10_000_000, naps
    assert run.lines("nap ms 10 got 11") == ["nap ms 10 got 11"] * 3


def test_failing_handlers_count_as_missed(procs, fixture):
    """A handler's exception must not reach the program: the call counts as missed, with the
    error kept; an entry handler's exception leaves that call unfollowed."""
    run = procs.spawn(fixture("ret_values"))
    proc = run.proc

    def on_return(tid, value, ns, x):
        if x % 2:
            raise ValueError(f"odd {x}")

    def entry(tid, regs):
        if regs.rdi % 5 == 0:
            raise KeyError(regs.rdi)
        return regs.rdi

    rp = proc.return_probe("ret_int", on_return, entry=entry)
    assert proc.run() == 0, run.text
    entry_failed = len(range(0, 40, 5))                         # 8: 0, 5, ..., 35
    odd = len([x for x in range(40) if x % 2 and x % 5])       # 16
    assert (rp.hits, rp.missed, rp.dropped) == (40 - entry_failed - odd, entry_failed + odd, 0)
    assert isinstance(rp.last_error, (ValueError, KeyError))
    assert len(run.lines("int x ")) == 40 and run.text.endswith("done\n")
