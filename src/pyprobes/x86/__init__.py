"""x86-64 instruction layer: decode, classify, relocate into slots, emulate, the arch side of a hit
(arch.py), the region, trampoline and patch of a jump-optimised probe (optimize.py), and the
in-process return probes' area and code (shadow.py).

This is the lowest layer of pyprobes: it knows instructions and bytes, never
processes. It imports only iced_x86 and the standard library so the layers
above can test it (and replace it) without a tracee.
"""
from __future__ import annotations

from .arch import (
    BREAKPOINT,
    BREAKPOINT_LENGTH,
    MAX_INSTRUCTION_LENGTH,
    SlotCopy,
    instruction_pointer,
    popped_return_slot,
    prepare_slot,
    return_address_slot,
    return_value,
    set_instruction_pointer,
    stack_pointer,
)
from .classify import Classification, Kind, classify
from .decode import Insn, MidInstructionError, decode_function, instruction_at
from .emulate import Emulation, compile_emulation
from .optimize import (
    JMP_REL32_LENGTH,
    RED_ZONE,
    TRAMPOLINE_SLOT_SIZE,
    Refusal,
    RefusalKind,
    Region,
    Trampoline,
    count_trampoline,
    find_region,
    jump_patch,
    stack_words,
    reached_addresses,
)
from .shadow import (
    ProbeStats,
    ShadowLayout,
    probe_stats,
    return_trampoline,
    shadow_entry_routine,
    shadow_header,
    thread_frames,
)
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
    "BREAKPOINT",
    "BREAKPOINT_LENGTH",
    "MAX_INSTRUCTION_LENGTH",
    "SlotCopy",
    "instruction_pointer",
    "popped_return_slot",
    "prepare_slot",
    "return_address_slot",
    "return_value",
    "set_instruction_pointer",
    "stack_pointer",
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
    "JMP_REL32_LENGTH",
    "RED_ZONE",
    "Refusal",
    "RefusalKind",
    "Region",
    "Trampoline",
    "count_trampoline",
    "find_region",
    "jump_patch",
    "stack_words",
    "reached_addresses",
    "TRAMPOLINE_SLOT_SIZE",
    "ProbeStats",
    "ShadowLayout",
    "probe_stats",
    "return_trampoline",
    "shadow_entry_routine",
    "shadow_header",
    "thread_frames",
]
