""".eh_frame records built by hand: every pointer encoding gcc or a linker may use, and the ways
a corrupt section ends (an ElfError after the good records, never a hang)."""
from __future__ import annotations

import struct

import pytest

from pyprobes.symbols import ElfError
from pyprobes.symbols.ehframe import fde_ranges

VADDR = 0x2000          # where the section is loaded
DATA_BASE = 0x4000      # .got, for DW_EH_PE_datarel
ABSPTR, ULEB, UDATA4, UDATA8, SDATA4, SDATA8 = 0x00, 0x01, 0x03, 0x04, 0x0B, 0x0C
PCREL, TEXTREL, DATAREL, INDIRECT = 0x10, 0x20, 0x30, 0x80
FORMATS = {ABSPTR: "<Q", UDATA4: "<I", UDATA8: "<Q", SDATA4: "<i", SDATA8: "<q"}


def uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def record(body: bytes, wide: bool = False) -> bytes:
    if wide:
        return struct.pack("<IQ", 0xFFFFFFFF, len(body)) + body
    return struct.pack("<I", len(body)) + body


def cie(encoding: int | None = SDATA4 | PCREL, augmentation: bytes = b"zR", wide: bool = False) -> bytes:
    body = struct.pack("<I", 0) + b"\x01" + augmentation + b"\0" + uleb(1) + b"\x78" + b"\x10"
    if augmentation.startswith(b"z"):
        data = b""
        for letter in augmentation[1:]:
            if letter == ord("P"):
                data += bytes([PCREL | SDATA4 | INDIRECT]) + struct.pack("<i", 0x100)
            elif letter == ord("L"):
                data += bytes([PCREL | SDATA4])
            elif letter == ord("R"):
                data += bytes([encoding])
        body += uleb(len(data)) + data
    body += b"\0" * (-len(body) % 4)  # DW_CFA_nop padding
    return record(body, wide)


def encode(value: int, encoding: int) -> bytes:
    if encoding & 0x0F == ULEB:
        return uleb(value)
    return struct.pack(FORMATS[encoding & 0x0F], value)


def fde(at: int, cie_at: int, start: int, size: int, encoding: int = SDATA4 | PCREL, wide: bool = False,
        augmentation: bool = True) -> bytes:
    """The FDE placed at section offset AT, for the CIE at CIE_AT."""
    pointer_at = at + (12 if wide else 4)
    field = pointer_at + 4
    value = start
    if encoding & 0x70 == PCREL:
        value = start - (VADDR + field)
    elif encoding & 0x70 == DATAREL:
        value = start - DATA_BASE
    body = struct.pack("<I", pointer_at - cie_at) + encode(value, encoding) + encode(size, encoding & 0x0F)
    if augmentation:
        body += uleb(0)
    return record(body + b"\0" * (-len(body) % 4), wide)


def section(encoding: int, ranges: list[tuple[int, int]], augmentation: bytes = b"zR") -> bytes:
    data = cie(encoding, augmentation)
    for start, size in ranges:
        data += fde(len(data), 0, start, size, encoding, augmentation=augmentation.startswith(b"z"))
    return data


RANGES = [(0x1139, 0x2A), (0x1170, 0x5), (0x1180, 0x301)]


@pytest.mark.parametrize("encoding", [
    SDATA4 | PCREL, ABSPTR, UDATA4, UDATA8, SDATA8, SDATA8 | PCREL, SDATA4 | DATAREL, ULEB,
], ids=hex)
def test_every_encoding_gives_the_ranges(encoding):
    data = section(encoding, RANGES) + struct.pack("<I", 0)
    assert list(fde_ranges(data, VADDR, DATA_BASE)) == RANGES


def test_a_cie_without_augmentation_means_absolute_pointers():
    assert list(fde_ranges(section(ABSPTR, RANGES, augmentation=b""), VADDR)) == RANGES


def test_personality_and_lsda_are_skipped_to_reach_the_fde_encoding():
    data = cie(SDATA4 | PCREL, b"zPLR")
    data += fde(len(data), 0, 0x1139, 0x10)
    assert list(fde_ranges(data, VADDR)) == [(0x1139, 0x10)]


def test_64_bit_lengths():
    data = cie(wide=True)
    data += fde(len(data), 0, 0x1139, 0x10, wide=True)
    assert list(fde_ranges(data, VADDR)) == [(0x1139, 0x10)]


def test_the_zero_terminator_ends_the_section():
    data = section(SDATA4 | PCREL, RANGES[:1]) + struct.pack("<I", 0) + b"\xff" * 64
    assert list(fde_ranges(data, VADDR)) == RANGES[:1]


def test_an_encoding_not_computed_skips_its_fdes_only():
    data = section(SDATA4 | TEXTREL, RANGES[:1])
    other = len(data)
    data += cie()
    data += fde(len(data), other, 0x1139, 0x10)
    assert list(fde_ranges(data, VADDR)) == [(0x1139, 0x10)]


def corrupt_cases():
    good = section(SDATA4 | PCREL, RANGES[:2])
    yield "length past the end", good + struct.pack("<I", 0x7FFFFFF0) + b"\0" * 8
    yield "64-bit length past the end", good + struct.pack("<IQ", 0xFFFFFFFF, 1 << 62) + b"\0" * 8
    yield "length under 4", good + struct.pack("<I", 2) + b"\0" * 8
    yield "CIE pointer before the section", good + record(struct.pack("<I", 0x10000) + b"\0" * 12)
    # The pointer names the previous FDE (at len(cie()) + len(first FDE)), not a CIE.
    second = len(cie()) + len(fde(len(cie()), 0, *RANGES[0]))
    yield "CIE pointer at an FDE", good + record(struct.pack("<I", len(good) + 4 - second) + b"\0" * 12)
    yield "unknown encoding", good + (lambda at: cie(0x07) + fde(at + len(cie(0x07)), at, 0, 0x10, SDATA4))(len(good))
    unterminated = struct.pack("<I", 0) + b"\x01zR\0" + b"\x80" * 12
    yield "unterminated LEB128", good + record(unterminated) + record(struct.pack("<I", len(good) + 4 + len(
        unterminated) + 4 - len(good)) + b"\0" * 8)
    yield "CIE version 9", good + (lambda at: (lambda c: c[:8] + b"\x09" + c[9:])(cie()) + fde(
        at + len(cie()), at, 0, 0x10))(len(good))


@pytest.mark.parametrize("data", [d for _n, d in corrupt_cases()], ids=[n for n, _d in corrupt_cases()])
def test_a_corrupt_record_raises_after_the_good_ones(data):
    seen = []
    with pytest.raises(ElfError, match="corrupt .eh_frame"):
        for r in fde_ranges(data, VADDR):
            seen.append(r)
    assert seen == RANGES[:2]


def test_random_bytes_end_in_a_result_or_an_elf_error():
    import random

    rng = random.Random(10)
    base = section(SDATA4 | PCREL, RANGES) + struct.pack("<I", 0)
    for _ in range(2000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            list(fde_ranges(bytes(data[: rng.randint(0, len(data))]), VADDR))
        except ElfError:
            pass
