"""x86-64 instruction layer: decode, classify, relocate into slots, emulate.

This is the lowest layer of pyprobes: it knows instructions and bytes, never
processes. It imports only iced_x86 and the standard library so the layers
above can test it (and replace it) without a tracee.
"""
from __future__ import annotations

from .classify import Classification, Kind, classify
from .decode import Insn, MidInstructionError, decode_function, instruction_at
from .emulate import Emulation, compile_emulation
from .relocate import (
    SLOT_SIZE,
    RelocationError,
    SlotCode,
    pushed_flags_fixup,
    relocate,
    return_address_fixup,
    step_fixup,
)

__all__ = [
    "SLOT_SIZE",
    "Classification",
    "Emulation",
    "Insn",
    "Kind",
    "MidInstructionError",
    "RelocationError",
    "SlotCode",
    "classify",
    "compile_emulation",
    "decode_function",
    "instruction_at",
    "pushed_flags_fixup",
    "relocate",
    "return_address_fixup",
    "step_fixup",
]
