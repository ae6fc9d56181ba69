"""The code of in-process return probes: the entry routine and the return trampoline (shadow.py
holds the area they work on and its contract; import both names from ``pyprobes.x86.shadow``).

Both read the return trampoline's address from the header word HEADER_TRAMPOLINE (the entry
routine writes it into the slot and compares a slot with it for a chained frame), and the
ring's record routine from HEADER_RECORD_ROUTINE (0: records are skipped whatever the flags).

Order of the stores, so that a signal handler that calls probed functions on the same thread
in the middle of either routine finds a consistent stack (its frames are pushed above ours
and its slots are lower than ours):

* entry: the new frame's slot, then depth + 1, then the rest of the frame, the entry record,
  the TSC (read last), and the slot's new return address (the return trampoline);
* return: the frame is read and the real return address written into the slot while the
  frame is still on the stack; depth - 1 is the last store.

A call that is not followed (depth or thread table exhausted: ``missed``) gets no entry record
either, so that every entry record has its return record.

A handler that interrupts the drop loop may drop (and count) the same dead frame once more;
the depth it leaves is the one ours computes. Only the cmpxchg loops (claiming a table entry,
raising the max) repeat, and only when another thread won the race: neither routine waits.

The return trampoline ends in ``ud2`` when the thread has no table entry or its top live frame
is not the returning call's: the return trampoline's address was in a slot the shadow stack
does not know (the tracer reset the stack under a live call), so no real return address exists
to go back to; the fault is at a known address in the code page.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from iced_x86 import Code, Instruction, MemoryOperand, Register

from .record import ROUTINE_FRAME, _assemble_list
from .shadow import (
    FRAME_SIZE,
    HEADER_OVERHEAD,
    HEADER_NS_PER_TICK,
    HEADER_RECORD_ROUTINE,
    HEADER_TRAMPOLINE,
    PAGE,
    PROBE_BUCKETS_OFFSET,
    RECORD_ENTRY,
    RECORD_RETURN,
    RETURN_RECORD_FLAG,
    THREAD_HEADER,
    THREAD_HASH_MULTIPLIER,
)

if TYPE_CHECKING:
    from .shadow import ShadowLayout

__all__ = ["SHADOW_CODE_BOUND", "return_trampoline", "shadow_entry_routine"]

# The layout enters both routines only as immediates and displacements of fixed width (one
# thread entry drops the hash): 446 + 421 bytes at most, so both fit one page with room for the
# ring's record routine. test_shadow checks the bound for small and large layouts.
SHADOW_CODE_BOUND = 1024

RAX, RBX, RCX, RDX = Register.RAX, Register.RBX, Register.RCX, Register.RDX
RSI, RDI, RSP = Register.RSI, Register.RDI, Register.RSP
R8, R9, R10, R11 = Register.R8, Register.R9, Register.R10, Register.R11

# Offsets in a frame (FRAME) and in a probe page (STATS).
_RET, _SLOT, _TSC, _ID, _ARGS = 0, 8, 16, 24, 32
_RESERVED, _MISSED, _DROPPED, _RESERVED_SUM, _MAX, _FLAGS, _ENTRY_ID, _RETURN_ID = range(0, 64, 8)
_KEY, _DEPTH = 0, 8


def _m(base: Register, displ: int = 0, index: Register = Register.NONE, scale: int = 1) -> MemoryOperand:
    return MemoryOperand(base, index, scale, displ)


def _locked(instruction: Instruction) -> Instruction:
    instruction.has_lock_prefix = True
    return instruction


def _load(reg: Register, mem: MemoryOperand) -> Instruction:
    return Instruction.create_reg_mem(Code.MOV_R64_RM64, reg, mem)


def _store(mem: MemoryOperand, reg: Register) -> Instruction:
    return Instruction.create_mem_reg(Code.MOV_RM64_R64, mem, reg)


def _push(*regs: Register) -> list[Instruction]:
    return [Instruction.create_reg(Code.PUSH_R64, r) for r in regs]


def _pop(*regs: Register) -> list[Instruction]:
    return [Instruction.create_reg(Code.POP_R64, r) for r in regs]


def _probe_page(reg: Register, probe_id: Register) -> list[Instruction]:
    """REG = the probe page's offset from the area (minus probes_offset): probe id * PAGE."""
    code = [] if reg == probe_id else [Instruction.create_reg_reg(Code.MOV_R64_RM64, reg, probe_id)]
    return code + [Instruction.create_reg_i32(Code.SHL_RM64_IMM8, reg, PAGE.bit_length() - 1)]


def _thread_lookup(layout: "ShadowLayout", tries: Register, claim: bool) -> list:
    """With rbx = the area and rax = the key (%fs:0): r10 = the thread's entry, label "found".
    Linear probing from the multiplicative hash; CLAIM: the first free entry is taken with
    lock cmpxchg (rax is the key again afterwards). Falls through (no label) after THREADS
    entries without the key (and, claiming, without a free one). Uses rcx, rdx and TRIES."""
    bits = layout.threads.bit_length() - 1
    items: list = [Instruction.create_reg_u32(Code.MOV_R32_IMM32, _low32(tries), layout.threads)]
    if bits:
        items += [
            Instruction.create_reg_u64(Code.MOV_R64_IMM64, RDX, THREAD_HASH_MULTIPLIER),
            Instruction.create_reg_reg(Code.MOV_R64_RM64, RCX, RAX),
            Instruction.create_reg_reg(Code.IMUL_R64_RM64, RCX, RDX),
            Instruction.create_reg_i32(Code.SHR_RM64_IMM8, RCX, 64 - bits),
        ]
    else:
        items.append(Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.ECX, Register.ECX))
    items += [
        ("label", "look"),
        Instruction.create_reg_reg_i32(Code.IMUL_R64_RM64_IMM32, R10, RCX, layout.thread_size),
        Instruction.create_reg_mem(Code.LEA_R64_M, R10, _m(RBX, layout.table_offset, R10)),
        _load(RDX, _m(R10, _KEY)),
        Instruction.create_reg_reg(Code.CMP_R64_RM64, RDX, RAX),
        (Code.JE_REL32_64, "found"),
    ]
    if claim:
        items += [
            Instruction.create_reg_reg(Code.TEST_RM64_R64, RDX, RDX),
            (Code.JNE_REL32_64, "next"),
            Instruction.create_reg_reg(Code.MOV_R64_RM64, RDX, RAX),
            Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.EAX, Register.EAX),
            _locked(Instruction.create_mem_reg(Code.CMPXCHG_RM64_R64, _m(R10, _KEY), RDX)),
            Instruction.create_reg_reg(Code.MOV_R64_RM64, RAX, RDX),  # mov keeps ZF
            (Code.JE_REL32_64, "found"),
            # Another thread (or a signal handler of ours, with our key) took it: look again.
            (Code.JMP_REL32_64, "look"),
            ("label", "next"),
        ]
    else:
        items += [
            Instruction.create_reg_reg(Code.TEST_RM64_R64, RDX, RDX),
            (Code.JE_REL32_64, "lost"),  # keys are never cleared: a free entry ends the chain
        ]
    items += [
        Instruction.create_reg(Code.INC_RM64, RCX),
        Instruction.create_reg_i32(Code.AND_RM64_IMM32, RCX, layout.threads - 1),
        Instruction.create_reg(Code.DEC_RM32, _low32(tries)),
        (Code.JNE_REL32_64, "look"),
    ]
    return items


def _low32(reg: Register) -> Register:
    return {RSI: Register.ESI, R9: Register.R9D, RCX: Register.ECX}[reg]


def _top_frame(dst: Register, depth: Register) -> list[Instruction]:
    """DST = the entry's (r10) frame number DEPTH - 1, the top of the stack."""
    return [
        Instruction.create_reg_reg_i32(Code.IMUL_R64_RM64_IMM32, dst, depth, FRAME_SIZE),
        Instruction.create_reg_mem(Code.LEA_R64_M, dst, _m(R10, THREAD_HEADER - FRAME_SIZE, dst)),
    ]


def _drop_frame(layout: "ShadowLayout", frame: Register, scratch: Register, depth: Register,
                then: str) -> list:
    """The frame at FRAME is dead: count it in its probe's ``dropped``, depth - 1 (stored)."""
    return [
        _load(scratch, _m(frame, _ID)),
        *_probe_page(scratch, scratch),
        _locked(Instruction.create_mem(Code.INC_RM64, _m(RBX, layout.probes_offset + _DROPPED, scratch))),
        Instruction.create_reg(Code.DEC_RM64, depth),
        _store(_m(R10, _DEPTH), depth),
        (Code.JMP_REL32_64, then),
    ]


def _latency() -> list:
    """r8 = the return's TSC, rax = the entry's, rbx = the area: r9 = the latency in ns,
    max(0, ticks - overhead) * ns-per-tick >> 32 (latency_ns()). Clobbers rax, rdx."""
    return [
        Instruction.create_reg_reg(Code.SUB_R64_RM64, R8, RAX),
        Instruction.create_reg_mem(Code.SUB_R64_RM64, R8, _m(RBX, HEADER_OVERHEAD)),
        Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, 0),  # mov keeps SF
        Instruction.create_reg_reg(Code.CMOVS_R64_RM64, R8, RAX),          # max(0, ticks)
        Instruction.create_reg_reg(Code.MOV_R64_RM64, RAX, R8),
        Instruction.create_mem(Code.MUL_RM64, _m(RBX, HEADER_NS_PER_TICK)),  # rdx:rax
        Instruction.create_reg_reg_u32(Code.SHRD_RM64_R64_IMM8, RAX, RDX, 32),
        Instruction.create_reg_reg(Code.MOV_R64_RM64, R9, RAX),
    ]


def _bucket() -> list:
    """r9 = a latency in ns: rax = its bucket (latency_bucket()). Clobbers rcx."""
    return [
        Instruction.create_reg_reg(Code.MOV_R64_RM64, RAX, R9),
        Instruction.create_reg_i32(Code.CMP_RM64_IMM8, R9, 8),
        (Code.JB_REL32_64, "bucketed"),                              # 0..7: their own buckets
        Instruction.create_reg_reg(Code.BSR_R64_RM64, RCX, R9),
        Instruction.create_reg_i32(Code.SUB_RM32_IMM8, Register.ECX, 3),
        Instruction.create_reg_reg(Code.SHR_RM64_CL, RAX, Register.CL),
        Instruction.create_reg_i32(Code.AND_RM32_IMM8, Register.EAX, 7),
        Instruction.create_reg_mem(Code.LEA_R64_M, RAX, _m(RAX, 8, RCX, 8)),  # 8*(b-2) + 3 bits
        ("label", "bucketed"),
    ]


def shadow_entry_routine(address: int, area: int, layout: "ShadowLayout") -> bytes:
    """The entry routine placed at ADDRESS, for the area at AREA with LAYOUT (see the module
    docstrings for its contract)."""
    saved = (RAX, RCX, RDX, RBX, R10, RSI)
    at = {reg: 8 * (len(saved) - 1 - i) for i, reg in enumerate(saved)}  # rsp-relative
    slot = ROUTINE_FRAME + 8 * len(saved)
    probes = layout.probes_offset
    thread_key = Instruction.create_reg_mem(Code.MOV_R64_RM64, RAX,
                                            MemoryOperand(displ=0, displ_size=8, seg=Register.FS))
    items: list = [
        *_push(*saved),
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, RBX, area),
        thread_key,
        *_thread_lookup(layout, RSI, claim=True),
        # the table is full: this call is not followed
        *_probe_page(RAX, R11),
        _locked(Instruction.create_mem(Code.INC_RM64, _m(RBX, probes + _MISSED, RAX))),
        (Code.JMP_REL32_64, "out"),

        ("label", "found"),
        _load(RCX, _m(R10, _DEPTH)),
        Instruction.create_reg_mem(Code.LEA_R64_M, RSI, _m(RSP, slot)),
        ("label", "drop"),
        Instruction.create_reg_reg(Code.TEST_RM64_R64, RCX, RCX),
        (Code.JE_REL32_64, "push"),
        *_top_frame(RAX, RCX),
        _load(RDX, _m(RAX, _SLOT)),
        Instruction.create_reg_reg(Code.CMP_R64_RM64, RDX, RSI),
        (Code.JA_REL32_64, "push"),       # above the new slot: a live caller's frame
        (Code.JB_REL32_64, "dead"),
        # the same slot: a chained frame (a tail call) if the slot holds the return trampoline
        _load(RDX, _m(RSI)),
        Instruction.create_reg_mem(Code.CMP_R64_RM64, RDX, _m(RBX, HEADER_TRAMPOLINE)),
        (Code.JE_REL32_64, "push"),
        ("label", "dead"),
        *_drop_frame(layout, RAX, RDX, RCX, "drop"),

        ("label", "push"),
        Instruction.create_reg_i32(Code.CMP_RM64_IMM32, RCX, layout.depth),
        (Code.JAE_REL32_64, "missed"),
        Instruction.create_reg_reg_i32(Code.IMUL_R64_RM64_IMM32, RAX, RCX, FRAME_SIZE),
        Instruction.create_reg_mem(Code.LEA_R64_M, RAX, _m(R10, THREAD_HEADER, RAX)),
        _store(_m(RAX, _SLOT), RSI),
        Instruction.create_reg(Code.INC_RM64, RCX),
        _store(_m(R10, _DEPTH), RCX),
        _load(RDX, _m(RSI)),
        _store(_m(RAX, _RET), RDX),
        _store(_m(RAX, _ID), R11),
        _store(_m(RAX, _ARGS), RDI),
    ]
    for i, reg in enumerate((RSI, RDX, RCX), start=1):
        items += [_load(RDX, _m(RSP, at[reg])), _store(_m(RAX, _ARGS + 8 * i), RDX)]
    items += [
        _store(_m(RAX, _ARGS + 32), R8),
        _store(_m(RAX, _ARGS + 40), R9),
        *_probe_page(RCX, R11),
        Instruction.create_mem_u32(Code.TEST_RM8_IMM8, _m(RBX, probes + _FLAGS, RCX), RECORD_ENTRY),
        (Code.JE_REL32_64, "stamp"),
        Instruction.create_mem_i32(Code.CMP_RM64_IMM8, _m(RBX, HEADER_RECORD_ROUTINE), 0),
        (Code.JE_REL32_64, "stamp"),
        # the record routine reads rdi..r9 and the ring probe id in r11 (ours: the caller saved it)
        Instruction.create_reg_mem(Code.MOV_R32_RM32, Register.R11D, _m(RBX, probes + _ENTRY_ID, RCX)),
        _load(RSI, _m(RSP, at[RSI])),
        _load(RDX, _m(RSP, at[RDX])),
        _load(RCX, _m(RSP, at[RCX])),
        Instruction.create_mem(Code.CALL_RM64, _m(RBX, HEADER_RECORD_ROUTINE)),
        Instruction.create_reg_mem(Code.LEA_R64_M, RSI, _m(RSP, slot)),
        ("label", "stamp"),
        Instruction.create_reg_reg(Code.MOV_R64_RM64, RCX, RAX),
        Instruction.create(Code.RDTSC),
        Instruction.create_reg_i32(Code.SHL_RM64_IMM8, RDX, 32),
        Instruction.create_reg_reg(Code.OR_R64_RM64, RAX, RDX),
        _store(_m(RCX, _TSC), RAX),
        _load(RAX, _m(RBX, HEADER_TRAMPOLINE)),
        _store(_m(RSI), RAX),
        *_pop(*reversed(saved)),
        # Back to the trampoline without popping the return stack buffer: its top entry (the
        # trampoline's) is what the function's ret, now bound for the return trampoline,
        # mispredicts against, so the caller's entry stays below it for the return
        # trampoline's ret to predict. r11 is the trampoline's to restore.
        *_pop(R11),
        Instruction.create_reg(Code.JMP_RM64, R11),
        ("label", "out"),
        *_pop(*reversed(saved)),
        Instruction.create(Code.RETNQ),
        ("label", "missed"),
        *_probe_page(RAX, R11),
        _locked(Instruction.create_mem(Code.INC_RM64, _m(RBX, probes + _MISSED, RAX))),
        (Code.JMP_REL32_64, "out"),
    ]
    return _assemble_list(items, address)


def return_trampoline(address: int, area: int, layout: "ShadowLayout") -> bytes:
    """The return trampoline placed at ADDRESS, for the area at AREA with LAYOUT."""
    saved_first = (RAX, RDX)                            # before rdtsc, which writes them
    saved = (RBX, R10, R11, RSI, RDI, R8, R9)           # after the flags
    order = (*saved_first, RCX, None, *saved)           # None: the flags' word
    at = {reg: 8 * (len(order) - 1 - i) for i, reg in enumerate(order)}
    slot = 8 * len(order)
    probes = layout.probes_offset
    thread_key = Instruction.create_reg_mem(Code.MOV_R64_RM64, RAX,
                                            MemoryOperand(displ=0, displ_size=8, seg=Register.FS))
    items: list = [
        Instruction.create_reg_mem(Code.LEA_R64_M, RSP, _m(RSP, -8)),  # the slot; lea keeps the flags
        *_push(*saved_first),
        Instruction.create(Code.RDTSC),
        # The flags as lahf and seto keep them (SF ZF AF PF CF, OF): cheaper than pushfq/popfq,
        # and nothing here changes DF, TF or IF.
        *_push(RCX),
        Instruction.create_reg_reg(Code.MOV_R32_RM32, Register.ECX, Register.EAX),
        Instruction.create_reg(Code.SETO_RM8, Register.AL),
        Instruction.create(Code.LAHF),
        *_push(RAX),
        *_push(*saved),
        Instruction.create_reg_i32(Code.SHL_RM64_IMM8, RDX, 32),
        Instruction.create_reg_reg(Code.OR_R64_RM64, RCX, RDX),
        Instruction.create_reg_reg(Code.MOV_R64_RM64, R8, RCX),   # r8 = the return's TSC
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, RBX, area),
        thread_key,
        *_thread_lookup(layout, R9, claim=False),
        ("label", "lost"),
        Instruction.create(Code.UD2),

        ("label", "found"),
        _load(RCX, _m(R10, _DEPTH)),
        Instruction.create_reg_mem(Code.LEA_R64_M, RSI, _m(RSP, slot)),
        ("label", "drop"),
        Instruction.create_reg_reg(Code.TEST_RM64_R64, RCX, RCX),
        (Code.JE_REL32_64, "lost"),
        *_top_frame(RDI, RCX),
        _load(RDX, _m(RDI, _SLOT)),
        Instruction.create_reg_reg(Code.CMP_R64_RM64, RDX, RSI),
        (Code.JB_REL32_64, "dead"),
        (Code.JA_REL32_64, "lost"),
        # rdi = the returning call's frame: its real return address goes back now
        _load(RDX, _m(RDI, _RET)),
        _store(_m(RSI), RDX),
        _load(RAX, _m(RDI, _TSC)),
        *_latency(),
        _load(RSI, _m(RDI, _ID)),
        # the sum in the thread's own entry: no lock (a signal handler runs between instructions)
        Instruction.create_mem_reg(Code.ADD_RM64_R64, _m(R10, layout.sums_offset, RSI, 8), R9),
        *_probe_page(RSI, RSI),
        Instruction.create_reg_mem(Code.LEA_R64_M, RSI, _m(RBX, probes, RSI)),  # rsi = the probe page
        # no returns count: the tracer sums the buckets (a locked op less, ~7 ns a call)
        _load(RAX, _m(RSI, _MAX)),
        ("label", "max"),
        Instruction.create_reg_reg(Code.CMP_R64_RM64, R9, RAX),
        (Code.JBE_REL32_64, "bucket"),
        _locked(Instruction.create_mem_reg(Code.CMPXCHG_RM64_R64, _m(RSI, _MAX), R9)),
        (Code.JNE_REL32_64, "max"),                                  # rax = the max another call set
        ("label", "bucket"),
        *_bucket(),
        _locked(Instruction.create_mem(Code.INC_RM64, _m(RSI, PROBE_BUCKETS_OFFSET, RAX, 8))),

        Instruction.create_mem_u32(Code.TEST_RM8_IMM8, _m(RSI, _FLAGS), RECORD_RETURN),
        (Code.JE_REL32_64, "pop"),
        Instruction.create_mem_i32(Code.CMP_RM64_IMM8, _m(RBX, HEADER_RECORD_ROUTINE), 0),
        (Code.JE_REL32_64, "pop"),
        Instruction.create_reg_mem(Code.MOV_R32_RM32, Register.R11D, _m(RSI, _RETURN_ID)),
        Instruction.create_reg_u32(Code.OR_RM32_IMM32, Register.R11D, RETURN_RECORD_FLAG),
        # args = (rax, entry TSC, entry rdi, rsi, rdx, rcx); rdi (the frame) goes last
        _load(RSI, _m(RDI, _TSC)),
        _load(RDX, _m(RDI, _ARGS)),
        _load(RCX, _m(RDI, _ARGS + 8)),
        _load(R8, _m(RDI, _ARGS + 16)),
        _load(R9, _m(RDI, _ARGS + 24)),
        _load(RDI, _m(RSP, at[RAX])),
        Instruction.create_mem(Code.CALL_RM64, _m(RBX, HEADER_RECORD_ROUTINE)),
        ("label", "pop"),
        Instruction.create_mem(Code.DEC_RM64, _m(R10, _DEPTH)),
        *_pop(*reversed(saved)),
        *_pop(RAX),
        Instruction.create_reg_i32(Code.ADD_RM8_IMM8, Register.AL, 0x7F),  # OF = the saved seto
        Instruction.create(Code.SAHF),
        *_pop(RCX),
        *_pop(*reversed(saved_first)),
        Instruction.create(Code.RETNQ),                               # through the slot

        ("label", "dead"),
        *_drop_frame(layout, RDI, RDX, RCX, "drop"),
    ]
    return _assemble_list(items, address)
