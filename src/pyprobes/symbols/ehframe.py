"""Function bounds from .eh_frame: every function's start and size, with symbols stripped or not.

The unwinder needs a Frame Description Entry (FDE) for every function an exception or a
backtrace may cross, so gcc and clang emit one per function by default, and ``strip`` keeps
them (they are loaded, not debug data). Layout and pointer encodings as the Linux Standard
Base describes them (Core spec, "Exception Frames"); gcc emits DW_EH_PE_pcrel|sdata4.

Input is a file's bytes, so every read is bounded by the record it belongs to, and every
loop advances by at least one record of at least four bytes: a corrupt section ends in an
ElfError, never a hang or an allocation sized by a corrupt field.
"""
from __future__ import annotations

import struct
from typing import Iterator, NamedTuple

from ..errors import PyprobesError
from .headers import ElfError

__all__ = ["FrameRange", "fde_ranges", "eh_frame_from_hdr", "read_encoded"]

DW_EH_PE_absptr = 0x00
DW_EH_PE_uleb128 = 0x01
DW_EH_PE_udata2 = 0x02
DW_EH_PE_udata4 = 0x03
DW_EH_PE_udata8 = 0x04
DW_EH_PE_sleb128 = 0x09
DW_EH_PE_sdata2 = 0x0A
DW_EH_PE_sdata4 = 0x0B
DW_EH_PE_sdata8 = 0x0C
DW_EH_PE_pcrel = 0x10
DW_EH_PE_textrel = 0x20
DW_EH_PE_datarel = 0x30
DW_EH_PE_funcrel = 0x40
DW_EH_PE_aligned = 0x50
DW_EH_PE_indirect = 0x80
DW_EH_PE_omit = 0xFF

_FIXED = {
    DW_EH_PE_absptr: struct.Struct("<Q"),
    DW_EH_PE_udata2: struct.Struct("<H"),
    DW_EH_PE_udata4: struct.Struct("<I"),
    DW_EH_PE_udata8: struct.Struct("<Q"),
    DW_EH_PE_sdata2: struct.Struct("<h"),
    DW_EH_PE_sdata4: struct.Struct("<i"),
    DW_EH_PE_sdata8: struct.Struct("<q"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MASK64 = (1 << 64) - 1
_LEB_MAX_BYTES = 10  # a 64-bit value; more is corruption, not a bigger number


class FrameRange(NamedTuple):
    """One FDE's code range, at link-time addresses."""

    start: int
    size: int


class _Unsupported(PyprobesError):
    """A well-formed encoding this reader does not compute (textrel, funcrel, aligned, indirect)."""


def _leb(data: bytes, p: int, end: int, signed: bool) -> tuple[int, int]:
    value = shift = 0
    for _ in range(_LEB_MAX_BYTES):
        if p >= end:
            raise ElfError(f"corrupt .eh_frame: LEB128 number at offset 0x{p:x} runs past its record")
        byte = data[p]
        p += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if signed and byte & 0x40:
                value -= 1 << shift
            return value, p
    raise ElfError(f"corrupt .eh_frame: LEB128 number at offset 0x{p:x} is longer than 64 bits")


def read_encoded(data: bytes, p: int, end: int, encoding: int, field_vaddr: int,
                 data_base: int) -> tuple[int, int]:
    """(value, offset after it) of the pointer encoded as ENCODING at DATA[P:], which lies at
    link-time FIELD_VADDR. ElfError if it runs past END or the format is unknown;
    _Unsupported for an application this reader does not compute."""
    fmt = encoding & 0x0F
    if fmt == DW_EH_PE_uleb128:
        value, q = _leb(data, p, end, signed=False)
    elif fmt == DW_EH_PE_sleb128:
        value, q = _leb(data, p, end, signed=True)
    elif fmt in _FIXED:
        st = _FIXED[fmt]
        q = p + st.size
        if q > end:
            raise ElfError(f"corrupt .eh_frame: pointer at offset 0x{p:x} runs past its record")
        (value,) = st.unpack_from(data, p)
    else:
        raise ElfError(f"corrupt .eh_frame: unknown pointer encoding 0x{encoding:02x} at offset 0x{p:x}")
    application = encoding & 0x70
    if encoding & DW_EH_PE_indirect or application not in (0, DW_EH_PE_pcrel, DW_EH_PE_datarel):
        raise _Unsupported(encoding)
    if application == DW_EH_PE_pcrel:
        value += field_vaddr
    elif application == DW_EH_PE_datarel:
        value += data_base
    return value & _MASK64, q


def _record(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """(offset of the CIE id / CIE pointer, end, length) of the record at POS; None at the terminator."""
    n = len(data)
    if pos + 4 > n:
        return None  # no room for a length: the section ends here
    (length,) = _U32.unpack_from(data, pos)
    if length == 0:
        return None
    body = pos + 4
    if length == 0xFFFFFFFF:
        if pos + 12 > n:
            raise ElfError(f"corrupt .eh_frame: truncated 64-bit length at offset 0x{pos:x}")
        (length,) = _U64.unpack_from(data, pos + 4)
        body = pos + 12
    end = body + length
    if end > n:
        raise ElfError(f"corrupt .eh_frame: record at offset 0x{pos:x} has length 0x{length:x}, "
                       f"past the section's 0x{n:x} bytes")
    if length < 4:
        raise ElfError(f"corrupt .eh_frame: record at offset 0x{pos:x} has length {length}, too short for its id")
    return body, end, length


def _cie_encoding(data: bytes, cie: int) -> int | None:
    """The FDE pointer encoding the CIE at offset CIE declares; None if its FDEs cannot be read
    (an augmentation without 'z', an encoding this reader does not compute)."""
    rec = _record(data, cie)
    if rec is None:
        raise ElfError(f"corrupt .eh_frame: an FDE points at offset 0x{cie:x}, which holds no CIE")
    body, end, _length = rec
    if _U32.unpack_from(data, body)[0] != 0:
        raise ElfError(f"corrupt .eh_frame: an FDE points at offset 0x{cie:x}, which holds another FDE")
    p = body + 4
    if p >= end:
        raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} is empty")
    version = data[p]
    p += 1
    nul = data.find(b"\0", p, end)
    if nul < 0:
        raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} has an unterminated augmentation")
    augmentation = data[p:nul]
    p = nul + 1
    if version not in (1, 3, 4):
        raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} has version {version}")
    if augmentation.startswith(b"eh"):
        p += 8  # the old g++ "eh" pointer
    if version == 4:
        p += 2  # address_size, segment_selector_size
    _code_align, p = _leb(data, p, end, signed=False)
    _data_align, p = _leb(data, p, end, signed=True)
    if version == 1:
        p += 1
    else:
        _return_register, p = _leb(data, p, end, signed=False)
    if not augmentation.startswith(b"z"):
        return DW_EH_PE_absptr if augmentation in (b"", b"eh") else None
    size, p = _leb(data, p, end, signed=False)
    stop = p + size
    if stop > end:
        raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} has augmentation data past its end")
    encoding = DW_EH_PE_absptr
    for letter in augmentation[1:]:
        if p >= stop and letter in b"LPR":
            raise ElfError(f"corrupt .eh_frame: CIE at offset 0x{cie:x} has too little augmentation data")
        if letter == ord("R"):
            encoding = data[p]
            p += 1
        elif letter == ord("L"):
            p += 1
        elif letter == ord("P"):
            personality = data[p]
            try:
                _value, p = read_encoded(data, p + 1, stop, personality & 0x7F, 0, 0)
            except _Unsupported:
                return None
        elif letter not in b"SBG":
            break  # unknown letter: 'z' says how long the data is, and R (if any) came before
    if encoding == DW_EH_PE_omit:
        return None
    return encoding


def fde_ranges(data: bytes, section_vaddr: int, data_base: int = 0) -> Iterator[FrameRange]:
    """The code range of every FDE in DATA, the bytes of an .eh_frame loaded at link-time
    SECTION_VADDR; DATA_BASE is what DW_EH_PE_datarel is relative to (.got, per the LSB).

    Ends at the zero terminator or the end of DATA. Raises ElfError at the first malformed
    record, after yielding the ranges before it. FDEs whose CIE uses an encoding this reader
    does not compute are skipped.
    """
    encodings: dict[int, int | None] = {}
    pos = 0
    while True:
        rec = _record(data, pos)
        if rec is None:
            return
        body, end, _length = rec
        (cie_pointer,) = _U32.unpack_from(data, body)
        if cie_pointer:
            cie = body - cie_pointer
            if cie < 0:
                raise ElfError(f"corrupt .eh_frame: FDE at offset 0x{pos:x} points before the section")
            if cie not in encodings:
                encodings[cie] = _cie_encoding(data, cie)
            encoding = encodings[cie]
            if encoding is not None:
                p = body + 4
                try:
                    start, p = read_encoded(data, p, end, encoding, section_vaddr + p, data_base)
                    size, p = read_encoded(data, p, end, encoding & 0x0F, 0, 0)
                except _Unsupported:
                    encodings[cie] = None
                else:
                    if size:
                        yield FrameRange(start, size)
        pos = end


def eh_frame_from_hdr(hdr: bytes, hdr_vaddr: int) -> int | None:
    """Link-time address of .eh_frame, from the bytes of .eh_frame_hdr (PT_GNU_EH_FRAME) at
    HDR_VADDR: how to find it in a file whose section headers were stripped too."""
    if len(hdr) < 4 or hdr[0] != 1 or hdr[1] == DW_EH_PE_omit:
        return None
    try:
        value, _p = read_encoded(hdr, 4, len(hdr), hdr[1], hdr_vaddr + 4, hdr_vaddr)
    except (ElfError, _Unsupported):
        return None
    return value
