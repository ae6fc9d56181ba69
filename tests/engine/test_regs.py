"""Register and flag clobber (invariant 7): eng_regs loads every general register and RFLAGS
(CF PF AF ZF SF DF OF, four patterns) with known values, runs a row of probed instructions
of every class, and checks every register, the flags (TF must stay clear) and RSP after.
Each label is probed; the program must see exactly what the bare instructions leave, with
the probes boosted, all stepped (boost=False), or stepped with post-handlers.
"""
from __future__ import annotations

import pytest

from .conftest import spec_of

ITERS = 400

# label -> mode with default options
LABELS = {
    "regs_p_lea": "boosted",
    "regs_p_push": "boosted",
    "regs_p_pop": "boosted",
    "regs_p_jcc": "emulated",
    "regs_p_nop": "emulated",
    "regs_p_jmp": "emulated",
    "regs_p_call": "emulated",
    "regs_p_ret": "boosted",
    "regs_p_mov": "boosted",
    "regs_p_rip": "boosted",
    "regs_p_xchg": "boosted",
    "regs_p_cmov": "boosted",
    "regs_p_endbr": "emulated",
    "regs_p_pushf": "boosted",
    "regs_p_popf": "boosted",
}

BASE = {"rax": 0x1111111111111111, "rbx": 0x2222222222222222, "rcx": 0x3333333333333333,
        "rdx": 0x4444444444444444, "rsi": 0x5555555555555555, "rdi": 0x6666666666666666,
        "rbp": 0x7777777777777777, "r8": 0x8888888888888888, "r9": 0x9999999999999999,
        "r10": 0xaaaaaaaaaaaaaaaa, "r11": 0xbbbbbbbbbbbbbbbb, "r12": 0xcccccccccccccccc,
        "r13": 0xdddddddddddddddd, "r14": 0xeeeeeeeeeeeeeeee, "r15": 0x0f0f0f0f0f0f0f0f}
PATTERNS = {0xcd7, 0x002, 0x043, 0x896}
CHECKED_FLAGS = 0xdd5


@pytest.mark.parametrize("how", ["default", "boost=False", "post"])
def test_probes_leave_registers_and_flags_alone(procs, fixture, how):
    exe = fixture("eng_regs")
    run = procs.spawn(exe, ITERS)
    proc = run.proc
    seen = {"pre": 0, "post": 0, "bad": []}

    def check_entry(tid, regs):
        # At regs_p_lea nothing has run yet: the handler sees exactly what the program loaded.
        seen["pre"] += 1
        got = {name: getattr(regs, name) for name in BASE}
        if got != BASE or regs.eflags & CHECKED_FLAGS not in {p & CHECKED_FLAGS for p in PATTERNS} \
                or regs.rip != probes["regs_p_lea"].address:
            seen["bad"].append(("pre", {k: hex(v) for k, v in got.items()}, hex(regs.eflags)))

    def post(tid, regs):
        seen["post"] += 1
        if regs.eflags & 0x100:
            seen["bad"].append(("post sees TF", hex(regs.eflags)))

    probes = {}
    for label, mode in LABELS.items():
        kw = {}
        if how == "boost=False":
            kw["boost"] = False
        elif how == "post" and mode != "emulated":
            kw["post"] = post
        if label == "regs_p_lea":
            kw["pre"] = check_entry
        probes[label] = proc.probe(spec_of(exe, "regs_run", label), **kw)
    assert run.finish() == 0, run.text
    res = run.results
    assert res[("regs",)] == {"iters": ITERS, "bad": 0, "flags_bad": 0, "rsp_bad": 0,
                              "scratch_bad": 0}, run.text
    assert res[()]["sigtrap"] == 0
    for label, mode in LABELS.items():
        p = probes[label]
        want = mode if how == "default" or mode == "emulated" else "stepped"
        assert (label, p.mode) == (label, want)
        assert (label, p.hits, p.missed) == (label, ITERS, 0)
    assert seen["bad"] == []
    assert seen["pre"] == ITERS
    if how == "post":
        assert seen["post"] == ITERS * sum(m != "emulated" for m in LABELS.values())


def test_handler_changes_reach_the_program(procs, fixture):
    """The one sanctioned change: what a handler sets. A pre-handler adds 1 to r15 before the
    lea runs, so the program sees r15 one higher in every iteration (and nothing else moves)."""
    exe = fixture("eng_regs")
    run = procs.spawn(exe, 8)

    def pre(tid, regs):
        regs.r15 += 1

    p = run.proc.probe(spec_of(exe, "regs_run", "regs_p_lea"), pre=pre)
    assert run.finish() == 1
    res = run.results
    assert res[("regs",)]["bad"] == 8 and res[("regs",)]["flags_bad"] == 0
    mismatches = [line for line in run.text.splitlines() if line.startswith("mismatch")]
    assert mismatches and all(line.startswith("mismatch r15 got 0xf0f0f0f0f0f0f20 want 0xf0f0f0f0f0f0f1f")
                              for line in mismatches)
    assert p.hits == 8 and p.mode == "boosted"
