"""parse_spec: the probe-spec grammar, without any process."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyprobes.symbols import Spec, SymbolError, parse_spec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("puts", Spec("puts", symbol="puts")),
        ("libc:puts", Spec("libc:puts", module="libc", symbol="puts")),
        ("libc:puts+4", Spec("libc:puts+4", module="libc", symbol="puts", offset=4)),
        ("libc:puts+0x1f", Spec("libc:puts+0x1f", module="libc", symbol="puts", offset=0x1F)),
        ("puts+010", Spec("puts+010", symbol="puts", offset=10)),
        ("/usr/lib/x86_64-linux-gnu/libc.so.6:malloc", Spec("/usr/lib/x86_64-linux-gnu/libc.so.6:malloc",
                                                            module="/usr/lib/x86_64-linux-gnu/libc.so.6",
                                                            symbol="malloc")),
        ("libc:0x77980", Spec("libc:0x77980", module="libc", address=0x77980)),
        ("prog:4096+8", Spec("prog:4096+8", module="prog", address=4104)),
        ("0x7f0000001000", Spec("0x7f0000001000", address=0x7F0000001000)),
        ("malloc%return", Spec("malloc%return", symbol="malloc", is_return=True)),
        ("libc:str*", Spec("libc:str*", module="libc", symbol="str*")),
        ("*alloc", Spec("*alloc", symbol="*alloc")),
        ("libc:mem[cs]?y", Spec("libc:mem[cs]?y", module="libc", symbol="mem[cs]?y")),
        ("memcpy@GLIBC_2.2.5", Spec("memcpy@GLIBC_2.2.5", symbol="memcpy@GLIBC_2.2.5")),
        ("_ZN3foo3barEv", Spec("_ZN3foo3barEv", symbol="_ZN3foo3barEv")),
        ("foo.cold", Spec("foo.cold", symbol="foo.cold")),
    ],
)
def test_valid(text, expected):
    assert parse_spec(text) == expected


def test_int_is_a_runtime_address():
    spec = parse_spec(0x401136)
    assert spec.address == 0x401136 and spec.module is None and spec.symbol is None
    assert spec.text == "0x401136"


def test_glob_flag():
    assert parse_spec("libc:str*").is_glob
    assert parse_spec("mem[cs]py").is_glob
    assert not parse_spec("puts").is_glob


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("puts+0xzz", "bad offset"),
        ("puts+", "bad offset"),
        ("puts+-4", "bad offset"),
        ("puts+4+4", "bad offset"),
        ("puts%ret", "unknown flag"),
        ("puts+4%return", "%return"),
        (":puts", "empty module"),
        ("libc:", "no symbol"),
        ("", "empty"),
        ("0x12g", "bad address"),
        ("12abc", "bad address"),
        ("pu ts", "bad symbol"),
        ("libc:pu/ts", "bad symbol"),
        (-1, "negative"),
        (1.5, "expected a string"),
    ],
)
def test_invalid(text, fragment):
    with pytest.raises(SymbolError) as info:
        parse_spec(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,30}", fullmatch=True)
modules = st.one_of(st.none(), st.from_regex(r"(/[a-z0-9_.+-]{1,8}){0,3}[a-z][a-z0-9_.+-]{0,12}", fullmatch=True))


@given(module=modules, name=names, offset=st.integers(0, 1 << 40), hexa=st.booleans(), ret=st.booleans())
def test_round_trip(module, name, offset, hexa, ret):
    text = (f"{module}:" if module else "") + name
    if offset and not ret:
        text += f"+{offset:#x}" if hexa else f"+{offset}"
    if ret:
        text += "%return"
    spec = parse_spec(text)
    assert spec.module == module
    assert spec.symbol == name
    assert spec.offset == (0 if ret else offset)
    assert spec.is_return == ret
    assert spec.address is None
