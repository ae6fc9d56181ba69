"""USDT notes and argument specs (symbols/notes.py, symbols/usdt.py): hand-built notes, every
operand form sys/sdt.h emits, and a C fixture built with <sys/sdt.h>."""
from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from pyprobes.symbols import ElfFile, SymbolError, parse_spec
from pyprobes.symbols.notes import stapsdt_notes
from pyprobes.symbols.usdt import UsdtError, parse_arg, usdt_probes


def _note(owner: bytes, ntype: int, desc: bytes) -> bytes:
    name = owner + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def _sdt(pc: int, base: int, sem: int, provider: str, name: str, args: str) -> bytes:
    return struct.pack("<QQQ", pc, base, sem) + b"\0".join(s.encode() for s in (provider, name, args)) + b"\0"


def test_hand_built_notes():
    data = (_note(b"GNU", 3, b"\x01\x02\x03\x04")  # a build-id: type 3 too, another owner
            + _note(b"stapsdt", 3, _sdt(0x1139, 0x2004, 0x4010, "prov", "one", "-4@%edi 8@$7"))
            + _note(b"stapsdt", 3, _sdt(0x1150, 0x2004, 0, "prov", "two", ""))
            + _note(b"stapsdt", 3, b"short"))
    notes = stapsdt_notes(data)
    assert [(n.pc, n.base, n.semaphore, n.provider, n.name, n.args) for n in notes] == [
        (0x1139, 0x2004, 0x4010, "prov", "one", "-4@%edi 8@$7"),
        (0x1150, 0x2004, 0, "prov", "two", ""),
    ]


REGS = SimpleNamespace(rax=2, rbx=0, rcx=0x1234_5678_9ABC_DEF0, rdx=0xFF, rsi=0x1000, rdi=0xFFFF_FFFE,
                       rbp=0x2000, rsp=0x3000, r8=0, r9=0, r10=0, r11=0, r12=-5 & (2**64 - 1), r13=0,
                       r14=0, r15=0, rip=0)
MEMORY = {0x1010: (-2 & 2**64 - 1).to_bytes(8, "little"), 0x1FF0: (0x8081).to_bytes(2, "little"),
          0x5010: (42).to_bytes(8, "little")}


def _read(address: int, size: int) -> bytes:
    return MEMORY[address][:size]


@pytest.mark.parametrize("text, value", [
    ("-4@%edi", -2),                 # a 32-bit register, signed
    ("4@%edi", 0xFFFF_FFFE),         # the same, unsigned
    ("8@%rdi", 0xFFFF_FFFE),
    ("-1@%dl", -1), ("1@%dl", 0xFF),
    ("2@%cx", 0xDEF0), ("-8@%r12", -5), ("4@%r12d", 0xFFFF_FFFB),
    ("1@%ch", 0xDE),                 # a high byte
    ("4@$5", 5), ("-4@$-3", -3), ("8@$0x10", 16),
    ("-2@-16(%rbp)", 0x8081 - 0x10000),   # memory at base + displacement
    ("8@(%rsi,%rax,8)", 2**64 - 2),        # base + index * scale
    ("-8@(%rsi,%rax,8)", -2),
    ("8@g(%rip)", 42), ("8@g+16(%rip)", None),
])
def test_argument_specs(text, value):
    arg = parse_arg(text, {"g": 0x4000}.get)
    if value is None:  # g+16 is at 0x4010, plus the load bias
        assert arg.value(REGS, _read, load_bias=0x1000) == 42
    else:
        assert arg.value(REGS, _read, load_bias=0x1010) == value
    assert arg.size in (1, 2, 4, 8)


@pytest.mark.parametrize("text", ["3@%eax", "4@%xyz", "4@$abc", "8@foo(%rip)", "8@foo(%rbp)", "4@(,%rax)"])
def test_bad_argument_specs(text):
    with pytest.raises(UsdtError):
        parse_arg(text, {}.get)


def test_usdt_spec_syntax():
    s = parse_spec("usdt:python:function__entry(str,str,int)")
    assert (s.module, s.provider, s.symbol, s.types) == (None, "python", "function__entry", ("str", "str", "int"))
    s = parse_spec("usdt:libfoo.so:p*:n?")
    assert (s.module, s.provider, s.symbol, s.types) == ("libfoo.so", "p*", "n?", None)
    assert parse_spec("libc:puts(str)").types == ("str",)
    assert parse_spec("work()").types == ()
    for bad in ("usdt:justone", "usdt:a:b(int", "puts(float)", "puts(int,,str)", "pu(ts)x"):
        with pytest.raises(SymbolError):
            parse_spec(bad)
    with pytest.raises(SymbolError, match="unknown type 'float'"):
        parse_spec("puts(float)")


@pytest.fixture(scope="session")
def usdt_exe(build):
    import os
    if not (os.path.exists("/usr/include/x86_64-linux-gnu/sys/sdt.h") or os.path.exists("/usr/include/sys/sdt.h")):
        pytest.skip("<sys/sdt.h> is not installed (systemtap-sdt-dev)")
    return build("usdt_probes.c")


def test_fixture_probes(usdt_exe):
    elf = ElfFile.load(usdt_exe)
    probes = {p.full_name: p for p in usdt_probes(elf)}
    assert set(probes) == {"usdt_fx:tick", "usdt_fx:constant", "usdt_fx:gated"}
    assert usdt_probes(elf) is usdt_probes(elf)  # cached per ElfFile
    sem = elf.object_address("usdt_fx_gated_semaphore")
    assert probes["usdt_fx:gated"].semaphore == sem
    assert len(probes["usdt_fx:tick"].args) == 6
    assert [(a.size, a.signed) for a in probes["usdt_fx:tick"].args][:3] == [(4, True), (1, True), (2, False)]
    assert probes["usdt_fx:constant"].args[0].is_constant
    for p in probes.values():
        assert elf.read_vaddr(p.address, 1) == b"\x90"  # the site is a nop
