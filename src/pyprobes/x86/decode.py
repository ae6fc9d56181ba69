"""Decode x86-64 machine code into instructions with known boundaries.

A probe may only land on an instruction boundary (invariant 5, docs/ARCHITECTURE.md), and the
only way to know the boundaries of variable-length x86 code is to decode from a
known boundary: the start of the function. Everything here therefore decodes
from the start of a buffer that begins at the function's address.
"""
from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import Code, Decoder, Formatter, FormatterSyntax, Instruction

from ..errors import PyprobesError

__all__ = ["Insn", "MidInstructionError", "decode_function", "instruction_at"]

_BITNESS = 64


def _make_formatter() -> Formatter:
    # Intel syntax with Python-style hex so messages read like the rest of
    # pyprobes ("0x401236"), not like MASM ("401236h").
    formatter = Formatter(FormatterSyntax.INTEL)
    formatter.hex_prefix = "0x"
    formatter.hex_suffix = ""
    formatter.uppercase_hex = False
    formatter.branch_leading_zeros = False
    formatter.show_branch_size = False
    return formatter


# One formatter for the module: building one costs far more than formatting.
_FORMATTER = _make_formatter()


class MidInstructionError(PyprobesError, ValueError):
    """A probe address that falls inside an instruction instead of on its first byte.

    Writing int3 there would corrupt the instruction that spans it, so the
    caller must refuse; the nearest boundaries are kept to suggest a fix.
    """

    def __init__(self, address: int, before: int, after: int) -> None:
        self.address = address
        self.before = before
        self.after = after
        super().__init__(
            f"{address:#x} is inside the instruction at {before:#x} (next boundary {after:#x})"
        )

    def __reduce__(self):  # keep the attributes when pickled across processes
        return (type(self), (self.address, self.before, self.after))


@dataclass(frozen=True)
class Insn:
    """One decoded instruction at its original address."""

    address: int
    length: int
    raw: bytes
    instruction: Instruction
    text: str

    @property
    def next_address(self) -> int:
        """Address of the following instruction: where execution falls through to."""
        return self.address + self.length

    @property
    def is_invalid(self) -> bool:
        return self.instruction.code == Code.INVALID

    def __str__(self) -> str:
        return f"{self.address:#x}: {self.text}"


_new = object.__new__


def _insn(code: bytes, offset: int, instruction: Instruction) -> Insn:
    # A frozen dataclass's __init__ goes through object.__setattr__ per field
    # and costs more than decoding and formatting together; filling the
    # instance dict directly builds the same object 2-3 times faster.
    # iced reports the bytes it consumed even for an invalid instruction (at
    # least one), so a caller can always step past it.
    length = instruction.len
    insn = _new(Insn)
    fields = insn.__dict__
    fields["address"] = instruction.ip
    fields["length"] = length
    fields["raw"] = code[offset:offset + length]
    fields["instruction"] = instruction
    fields["text"] = _FORMATTER.format(instruction)
    return insn


def decode_function(code: bytes, address: int) -> list[Insn]:
    """Decode all of CODE, which starts at ADDRESS, into instructions.

    Invalid bytes become an Insn whose ``instruction.code`` is ``Code.INVALID``
    (iced skips at least one byte, sometimes more), so classification can
    refuse them and decoding goes on; boundaries found after invalid bytes are
    iced's best guess, not facts. A truncated last instruction is likewise
    reported as invalid.
    """
    code = bytes(code)  # iced copies anything that is not immutable bytes
    decoder = Decoder(_BITNESS, code, ip=address)
    # One Decoder over the whole buffer: per-instruction Decoder construction
    # costs more than the decoding itself.
    return [_insn(code, instruction.ip - address, instruction) for instruction in decoder]


def instruction_at(code: bytes, function_address: int, address: int) -> Insn:
    """Return the instruction that starts exactly at ADDRESS.

    CODE starts at FUNCTION_ADDRESS, a known boundary. Raises
    MidInstructionError when ADDRESS falls inside an instruction, ValueError
    when it is outside CODE.
    """
    end = function_address + len(code)
    if not function_address <= address < end:
        raise ValueError(
            f"{address:#x} is outside the code decoded at {function_address:#x}..{end:#x}"
        )
    code = bytes(code)
    decoder = Decoder(_BITNESS, code, ip=function_address)
    # Walk boundaries with one reused Instruction and format only the one we
    # return: a probe on a big function should not pay for formatting it all.
    scratch = Instruction()
    while decoder.can_decode:
        decoder.decode_out(scratch)
        start = scratch.ip
        if start == address:
            return _insn(code, start - function_address, scratch.copy())
        end_of_insn = start + scratch.len
        if address < end_of_insn:
            raise MidInstructionError(address, start, end_of_insn)
    raise ValueError(f"{address:#x} was not reached while decoding from {function_address:#x}")
