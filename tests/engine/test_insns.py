"""Every class of probed instruction gives the program its correct results: the emulated ones
(jmp rel8/rel32, jcc rel8/rel32 taken and not taken, call, endbr64), ret, ret imm16 and push
reg (boosted: cheaper than emulating them), an indirect call (stepped, return address fixed
up), RIP-relative load, store and lea (boosted from a slot with the displacement
re-targeted), and leaf functions keeping data in their red zone (invariant 7) -- one in
assembly, one compiled C whose locals gcc puts below RSP.
Also probe-spec errors (invariant 5): mid-instruction addresses and refused instructions.
"""
from __future__ import annotations

import pytest
from iced_x86 import Register

import pyprobes
from pyprobes.x86 import decode_function

from .conftest import function_bytes, labels, read_mem, spec_of

THREADS = 2
ITERS = 300

# site -> (function, expected mode)
SITES = {
    "em_jmp8": ("em_jmp8", "emulated"),
    "em_jmp32": ("em_jmp32", "emulated"),
    "em_jcc_at": ("em_jcc", "emulated"),
    "em_jcc32_at": ("em_jcc32", "emulated"),
    "em_call": ("em_call", "emulated"),
    "em_icall_at": ("em_icall", "stepped"),
    "bo_ret_at": ("bo_ret", "boosted"),
    "bo_reti_at": ("bo_reti_callee", "boosted"),
    "bo_push": ("bo_push", "boosted"),
    "em_endbr": ("em_endbr", "emulated"),
    "rip_load": ("rip_load", "boosted"),
    "rip_store": ("rip_store", "boosted"),
    "rip_lea": ("rip_lea", "boosted"),
    "rz_p_lea": ("rz_leaf", "boosted"),
    "rz_p_nop": ("rz_leaf", "emulated"),
    "rz_p_jmp": ("rz_leaf", "emulated"),
    "rz_p_load": ("rz_leaf", "boosted"),
    "rz_p_rip": ("rz_leaf", "boosted"),
    "rz_p_cmp": ("rz_leaf", "boosted"),
    "rz_p_jcc": ("rz_leaf", "emulated"),
}
FUNCTIONS = ["em_jmp8", "em_jmp32", "em_jcc", "em_jcc32", "em_helper", "em_call", "em_icall",
             "bo_ret", "bo_reti", "bo_reti_callee", "bo_push", "em_endbr", "rip_load", "rip_store",
             "rip_lea", "rz_leaf", "rz_c"]
# functions the program does not call itself: whose calls they are counted as
CALLED_BY = {"em_helper": ("em_call", "em_icall"), "bo_reti_callee": ("bo_reti",)}


@pytest.fixture(scope="module")
def insns(build):
    # -O2 after the builder's -O1: rz_c's locals go to the red zone (checked below).
    return build("eng_insns.c", "-pthread", "-O2")


def _check_results(run):
    assert run.finish() == 0, run.text
    res = run.results
    assert res[()]["sigtrap"] == 0
    for key, values in res.items():
        if key and key[0] == "func":
            assert values["bad"] == 0, (key, run.text)
    return {key[1]: values["calls"] for key, values in res.items() if key and key[0] == "func"}


def test_each_instruction_class_under_a_probe(procs, insns):
    run = procs.spawn(insns, ITERS, THREADS)
    probes = {site: run.proc.probe(spec_of(insns, func, site)) for site, (func, _) in SITES.items()}
    calls = _check_results(run)
    for site, (func, mode) in SITES.items():
        p = probes[site]
        assert (site, p.mode) == (site, mode)
        n = calls[CALLED_BY.get(func, (func,))[-1]]
        assert (site, p.hits, p.missed) == (site, n, 0)
    assert all(n == ITERS * THREADS for n in calls.values())


@pytest.mark.parametrize("boost", [True, False])
def test_probe_on_every_instruction(procs, insns, boost):
    """Every instruction of every function probed at once (refused ones excepted: ud2): the
    functions, loops and red-zone leaves included, still compute the right results."""
    run = procs.spawn(insns, 40, THREADS)
    proc = run.proc
    entries = {}
    placed = refused = 0
    for func in FUNCTIONS:
        link, code = function_bytes(insns, func)
        for insn in decode_function(code, link):
            try:
                p = proc.probe(f"{func}+{insn.address - link:#x}", boost=boost)
            except pyprobes.ProbeError as e:
                assert "ud2" in str(e)
                refused += 1
                continue
            placed += 1
            if insn.address == link:
                entries[func] = p
    assert refused == 3 and placed > 100  # the never-run ud2 in em_jmp8, em_jmp32 and rz_leaf
    calls = _check_results(run)
    for func, p in entries.items():
        want = sum(calls[f] for f in CALLED_BY.get(func, (func,)))
        assert (func, p.hits, p.missed) == (func, want, 0)
    modes = {p.mode for p in proc.probes}
    assert modes == ({"boosted", "stepped", "emulated"} if boost else {"stepped", "emulated"})


def test_c_leaf_keeps_its_locals_in_the_red_zone(insns):
    """The premise of the red-zone checks: rz_c stores below RSP and never moves RSP."""
    link, code = function_bytes(insns, "rz_c")
    below = moves_rsp = 0
    for insn in decode_function(code, link):
        i = insn.instruction
        if i.memory_base == Register.RSP and i.memory_displacement >= 1 << 63:
            below += 1
        if i.op0_register == Register.RSP or "push" in insn.text or "call" in insn.text:
            moves_rsp += 1
    assert below >= 2 and moves_rsp == 0


def test_probe_spec_errors(procs, insns):
    run = procs.spawn(insns, 10, 1)
    proc = run.proc
    table = labels(insns)
    # em_jcc starts with `test rdi, 1`, 7 bytes long: +1 is inside it.
    with pytest.raises(pyprobes.ProbeError) as e:
        proc.probe("em_jcc+1")
    start = proc.engine.targets("em_jcc")[0].address
    msg = str(e.value)
    assert f"{start + 1:#x}" in msg and f"{start:#x}" in msg and f"{start + 7:#x}" in msg, msg
    with pytest.raises(pyprobes.ProbeError, match="em_jcc"):
        proc.probe("em_jcc+0x3")
    # Refused instructions, with their reason.
    with pytest.raises(pyprobes.ProbeError, match="syscall") as e:
        proc.probe(spec_of(insns, "bad_syscall", "bad_syscall_at"))
    assert "syscall" in str(e.value).split(":", 2)[-1]
    with pytest.raises(pyprobes.ProbeError, match="int3"):
        proc.probe("bad_int3")
    with pytest.raises(pyprobes.ProbeError, match="ud2"):
        proc.probe("bad_ud2")
    # A raw runtime address inside an instruction is refused the same way.
    with pytest.raises(pyprobes.ProbeError, match="inside the instruction"):
        proc.probe(start + 2)
    # Nothing was left behind: no point, no slot, no int3 in the text.
    assert proc.engine.points == {} and proc.slots.stats()["slots_used"] == 0
    link, code = function_bytes(insns, "em_jcc")
    assert read_mem(proc.pid, start, len(code)) == code
    assert table["em_jcc_at"] - table["em_jcc"] == 7
    _check_results(run)
