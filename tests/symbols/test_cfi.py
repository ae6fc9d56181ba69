"""symbols/cfi.py: call frame instructions evaluated to CFA rows, on hand-built CIE/FDE bytes
and on compiled code compared row by row with `readelf --debug-dump=frames-interp`."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from pyprobes.symbols.cfi import (OFFSET, REGISTER, UNDEFINED, CfiTable, cfi_of, evaluate_expression,
                                  parse_cfi)
from pyprobes.symbols.elf import ElfFile

RSP, RBP, RBX, RA = 7, 6, 3, 16
_NAMES = {0: "rax", 1: "rdx", 2: "rcx", 3: "rbx", 4: "rsi", 5: "rdi", 6: "rbp", 7: "rsp",
          **{n: f"r{n}" for n in range(8, 16)}, 16: "ra"}


def _uleb(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _sleb(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        done = (v == 0 and not b & 0x40) or (v == -1 and b & 0x40)
        out.append(b | (0 if done else 0x80))
        if done:
            return bytes(out)


def _section(cie_instructions: bytes, fdes: list[tuple[int, int, bytes]], vaddr: int = 0x1000) -> bytes:
    """A section: one "zR" CIE (code align 1, data align -8, ra 16, pcrel|sdata4) and FDES
    (start, size, instructions), padded to 4 bytes, with a zero terminator."""
    body = struct.pack("<I", 0) + b"\x01zR\0" + _uleb(1) + _sleb(-8) + _uleb(16) + _uleb(1) + b"\x1b"
    body += cie_instructions
    body += b"\0" * (-len(body) % 4)
    data = bytearray(struct.pack("<I", len(body)) + body)
    for start, size, insns in fdes:
        at = len(data)
        field = at + 8  # the pc_begin field: after length and CIE pointer
        fbody = struct.pack("<I", at + 4) + struct.pack("<i", start - (vaddr + field)) + struct.pack("<I", size)
        fbody += _uleb(0) + insns
        fbody += b"\0" * (-len(fbody) % 4)
        data += struct.pack("<I", len(fbody)) + fbody
    return bytes(data + b"\0\0\0\0")


_CIE = bytes([0x0C, RSP, 8, 0x80 | RA, 1])  # def_cfa rsp+8; offset ra at cfa-8


def _table(fdes, cie=_CIE) -> CfiTable:
    fdes_parsed, error = parse_cfi(_section(cie, fdes), 0x1000)
    assert error is None
    return CfiTable(fdes_parsed)


def test_push_frame_and_advance():
    # push rbp; (mov rbp,rsp); ... : offset rbp, def_cfa_register, advance_loc1 / 2 / 4
    insns = bytes([0x41, 0x0E, 16, 0x80 | RBP, 2, 0x43, 0x0D, RBP, 0x02, 0x10, 0x0C, RSP, 8,
                   0x03, 0x00, 0x01, 0xC0 | RBP])
    t = _table([(0x2000, 0x300, insns)])
    assert t.row_at(0x1fff) is None and t.row_at(0x2300) is None
    r0 = t.row_at(0x2000)
    assert (r0.cfa_register, r0.cfa_offset, r0.rules) == (RSP, 8, {RA: (OFFSET, -8)})
    r1 = t.row_at(0x2001)
    assert (r1.cfa_register, r1.cfa_offset, r1.rules[RBP]) == (RSP, 16, (OFFSET, -16))
    r4 = t.row_at(0x2004)
    assert (r4.cfa_register, r4.cfa_offset) == (RBP, 16)
    r2 = t.row_at(0x2014)
    assert (r2.cfa_register, r2.cfa_offset, r2.rules[RBP]) == (RSP, 8, (OFFSET, -16))
    r3 = t.row_at(0x2114)  # restore rbp: back to the CIE's (no rule)
    assert RBP not in r3.rules and r3.rules[RA] == (OFFSET, -8)


def test_remember_restore_extended_and_misc():
    insns = bytes([0x41, 0x0E, 16, 0x05, RBX]) + _uleb(2)          # offset_extended rbx, cfa-16
    insns += bytes([0x0A, 0x41, 0x0E, 8, 0x07, RBX])                # remember; cfa 8; undefined rbx
    insns += bytes([0x41, 0x0B])                                    # restore_state
    insns += bytes([0x41, 0x11, 12]) + _sleb(3)                     # offset_extended_sf r12 at cfa-24
    insns += bytes([0x2E]) + _uleb(32) + bytes([0x00])              # GNU_args_size, nop
    insns += bytes([0x41, 0x09, 13, 0x00, 0x08, 12])                # register r13 in rax; same_value r12
    insns += bytes([0x41, 0x13]) + _sleb(-4)                        # def_cfa_offset_sf 32
    t = _table([(0x3000, 0x100, insns)])
    assert t.row_at(0x3001).rules[RBX] == (OFFSET, -16)
    r = t.row_at(0x3002)
    assert (r.cfa_offset, r.rules[RBX]) == (8, (UNDEFINED, 0))
    r = t.row_at(0x3003)
    assert (r.cfa_offset, r.rules[RBX]) == (16, (OFFSET, -16))
    assert t.row_at(0x3004).rules[12] == (OFFSET, -24)
    r = t.row_at(0x3005)
    assert r.rules[13] == (REGISTER, 0) and 12 not in r.rules
    assert t.row_at(0x3006).cfa_offset == 32


def test_plt_cfa_expression():
    # gcc/ld's PLT: CFA = rsp + 8 + ((rip & 15) >= 11 ? 8 : 0)
    expr = bytes([0x77, 8, 0x80, 0, 0x3F, 0x1A, 0x3B, 0x2A, 0x33, 0x24, 0x22])
    t = _table([(0x4000, 0x40, bytes([0x0F]) + _uleb(len(expr)) + expr)])
    row = t.row_at(0x4010)
    assert row.cfa_expression == expr
    regs = {RSP: 0x7000, RA: 0x4012}
    assert evaluate_expression(expr, regs.get) == 0x7008
    regs[RA] = 0x401B
    assert evaluate_expression(expr, regs.get) == 0x7010
    assert evaluate_expression(bytes([0x96]), regs.get) is None  # DW_OP_nop... unknown here: stop


def test_corrupt_instructions_give_no_row():
    t = _table([(0x5000, 0x10, bytes([0x0B]))])  # restore_state with nothing remembered
    assert t.row_at(0x5000) is None
    t = _table([(0x5000, 0x10, bytes([0x3F]))])  # unknown opcode
    assert t.row_at(0x5004) is None


_ROW = re.compile(r"^([0-9a-f]{16}) (.*)$")


def _readelf_rows(path: str) -> dict[int, tuple[str, dict[str, str]]]:
    # readelf exits 1 on a few warnings about other sections; its frame rows are still complete
    out = subprocess.run(["readelf", "--debug-dump=frames-interp", path], capture_output=True, text=True).stdout
    rows: dict[int, tuple[str, dict[str, str]]] = {}
    header: list[str] = []
    for line in out.splitlines():
        if " CIE" in line:
            header = []  # a CIE's own rows are at location 0
            continue
        if "FDE cie=" in line:
            header = ["?"]
            continue
        if line.strip().startswith("LOC") and header:
            header = line.split()[2:]
            continue
        m = _ROW.match(line)
        if m and header:
            cols = re.findall(r"r\d+ \([a-z0-9]+\)|\S+", m.group(2))  # a register rule reads "r9 (r9)"
            rows[int(m.group(1), 16)] = (cols[0], dict(zip(header, cols[1:])))
    return rows


def _ours(row) -> tuple[str, dict[str, str]]:
    cfa = "exp" if row.cfa_expression is not None else f"{_NAMES[row.cfa_register]}+{row.cfa_offset}"
    cols = {}
    for reg, rule in row.rules.items():
        name = _NAMES.get(reg, f"r{reg}")
        cols[name] = {OFFSET: lambda v: f"c{v:+d}", UNDEFINED: lambda v: "u",
                      REGISTER: lambda v: f"r{v} ({_NAMES[v]})",
                      "expression": lambda v: "exp", "val_expression": lambda v: "vexp",
                      "val_offset": lambda v: f"v{v:+d}"}.get(rule.kind, lambda v: rule.kind)(rule.value)
    return cfa, cols


def _compare(path: str, limit: int | None = None) -> int:
    table = cfi_of(ElfFile.load(path))
    rows = _readelf_rows(path)
    checked = 0
    for loc, (cfa, cols) in sorted(rows.items())[:limit]:
        row = table.row_at(loc)
        assert row is not None, hex(loc)
        ours_cfa, ours = _ours(row)
        assert ours_cfa == cfa, (hex(loc), ours_cfa, cfa)
        for name, value in cols.items():
            assert ours.get(name, "u") == value, (hex(loc), name, ours.get(name), value)
        checked += 1
    return checked


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf is not installed")
def test_matches_readelf_on_compiled_fixture(build):
    exe = build("stk_chain.c", "-O2", "-fomit-frame-pointer", output="stk_chain_o2")
    assert _compare(str(exe)) > 10
    table = cfi_of(ElfFile.load(str(exe)))
    assert cfi_of(ElfFile.load(str(exe))) is table  # parsed once per module


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf is not installed")
def test_matches_readelf_on_libc():
    import ctypes.util
    import os
    libc = next((p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6")
                 if os.path.exists(p)), None)
    if libc is None:
        pytest.skip("no libc.so.6 at the Debian path")
    assert _compare(libc, limit=3000) > 1000


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf is not installed")
def test_debug_frame_adds_what_eh_frame_lacks(build):
    # -fno-asynchronous-unwind-tables -g: the program's own functions are in .debug_frame only
    exe = build("stk_chain.c", "-O2", "-fomit-frame-pointer", "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables", output="stk_chain_debug_frame")
    elf = ElfFile.load(str(exe))
    eh, _error = parse_cfi(*elf.eh_frame_bytes())
    stk_b = next(s for s in elf.functions if s.name == "stk_b")
    assert not any(f.start <= stk_b.address < f.end for f in eh)
    assert cfi_of(elf).row_at(stk_b.address + 9).cfa_offset == 32  # after three pushes
    assert _compare(str(exe)) > 10  # readelf's rows of both sections
