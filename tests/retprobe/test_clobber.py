"""Registers and flags across a probed call and its probed return (invariant 7): the entry path
hands the function exactly the caller's registers, flags and red zone, and the return path
changes nothing but RIP. The fixture checks it by itself (ret_clobber.c); here the tracer also
checks what it saw at the entry and at the return."""
from __future__ import annotations

import re
import struct

ROUNDS = 200
REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
FLAGS_A = (0x0D5, 0x801, 0x044, 0x8C5)
FLAGS_MASK = 0xDD5


def pat_a(r: int, i: int) -> int:
    return 0xA5A5000000000000 | r << 24 | i << 8 | 0x11


def pat_b(r: int, i: int) -> int:
    return 0x5B5B000000000000 | r << 24 | i << 8 | 0x22


def test_probed_return_changes_only_rip(procs, fixture):
    run = procs.spawn(fixture("ret_clobber"), ROUNDS)
    proc = run.proc
    bad_entry, returns = [], []

    def entry(tid, regs):
        r = (regs.rax >> 24) & 0xFFFFFF
        got = {name: getattr(regs, name) for name in REGS}
        want = {name: pat_a(r, i) for i, name in enumerate(REGS)}
        if got != want or regs.eflags & FLAGS_MASK != FLAGS_A[r % 4]:
            bad_entry.append((r, got, regs.eflags))
        return r

    def handler(tid, value, ns, r):
        returns.append((r, int(value), bytes(value.xmm0)))

    rps = [proc.return_probe(name, handler, entry=entry) for name in ("clob", "clob_nop")]
    assert proc.run() == 0, run.text
    m = re.search(r"^rounds (\d+) bad_in (\d+) bad_out (\d+) bad_rsp (\d+) bad_redzone (\d+) bad_xmm (\d+)$",
                  run.text, re.M)
    assert m, run.text
    assert tuple(map(int, m.groups())) == (ROUNDS, 0, 0, 0, 0, 0)
    assert bad_entry == []
    # clob runs its entry probe from a slot (stepped, then boosted); clob_nop's is emulated
    assert rps[0].entry_probe.mode == "boosted" and rps[1].entry_probe.mode == "emulated"
    assert [(rp.hits, rp.missed, rp.dropped) for rp in rps] == [(ROUNDS // 2, 0, 0)] * 2
    assert [r for r, _, _ in returns] == list(range(ROUNDS))
    for r, rax, xmm0 in returns:
        assert rax == pat_b(r, 0)
        assert xmm0[:8] == struct.pack("<Q", 0x3FF0000000000000 | r << 8)
