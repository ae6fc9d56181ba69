"""The whole layer over real compiled code: the C library this test runs on.

Hand-written tables miss what compilers actually emit; this decodes a slice of
libc's .text and checks that every instruction classifies, that every boosted
or stepped one relocates to a far slot with the same targets, and that every
emulated one compiles.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from iced_x86 import Decoder

from pyprobes.x86 import Kind, RelocationError, classify, compile_emulation, decode_function, relocate

SLICE = 48 * 1024
BASE = 0x7F12_3400_0000  # a realistic shared-library address
SLOT_DISTANCE = 0x4000_0000  # 1 GiB away, as a slot page mapped "near" the module would be at worst


def _libc() -> Path | None:
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "/libc.so" in path or "/libc-" in path:
                return Path(path)
    except OSError:
        pass
    return None


def _text(path: Path) -> tuple[bytes, int]:
    from elftools.elf.elffile import ELFFile

    with path.open("rb") as f:
        elf = ELFFile(f)
        text = elf.get_section_by_name(".text")
        if text is None:
            pytest.skip(f"{path} has no .text")
        data = text.data()
        return data[:SLICE], text["sh_addr"]


@pytest.fixture(scope="module")
def libc_insns():
    path = _libc()
    if path is None:
        pytest.skip("libc not found in /proc/self/maps")
    code, address = _text(path)
    return decode_function(code, BASE + address)


def test_libc_slice_classifies_relocates_and_emulates(libc_insns):
    kinds = {kind: 0 for kind in Kind}
    slot_address = (libc_insns[0].address + SLOT_DISTANCE) & ~0xFFF
    for insn in libc_insns:
        verdict = classify(insn)
        kinds[verdict.kind] += 1
        if verdict.kind is not Kind.BOOST:
            assert verdict.reason
        if verdict.kind is Kind.EMULATE:
            compile_emulation(insn)
        elif verdict.kind in (Kind.BOOST, Kind.STEP):
            try:
                slot = relocate(insn, slot_address, boosted=verdict.kind is Kind.BOOST)
            except RelocationError as exc:  # pragma: no cover - reported with context
                pytest.fail(f"{insn}: {exc}")
            copy = next(iter(Decoder(64, slot.code, ip=slot_address)))
            assert copy.code == insn.instruction.code, insn
            if insn.instruction.is_ip_rel_memory_operand:
                assert copy.ip_rel_memory_address == insn.instruction.ip_rel_memory_address, insn
            assert slot.resume_address == insn.address + insn.length
            slot_address += 32
    # compiled code is mostly boostable, with many emulated branches/calls
    assert kinds[Kind.BOOST] > kinds[Kind.STEP]
    assert kinds[Kind.EMULATE] > 0
