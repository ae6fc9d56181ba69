"""The ``record`` action of jump-optimised probes (issue 11): a ring buffer record per hit, no stop.

The record action's trampoline (record_action_trampoline) calls one shared routine that does
the whole action, so that it fits a 64-byte slot with any region::

    lea rsp,[rsp-128]          ; step over the red zone
    push r11
    lea r11,[rip+C]            ; the probe's counter
    call qword [rip+P]         ; P: the action routine's address, a word of the counter page
    pop r11
    lea rsp,[rsp+128]
    <the region's instructions, relocated>
    jmp region.end

The action routine (record_action_routine) saves the flags it changes as the count action does
(seto/lahf, not pushfq/popfq: popfq alone costs more than the rest of a count), reads the
probe id from the counter page (PROBE_ID_OFFSET past the counter) and runs the record
routine's body; a record it drops it counts in the counter. Every hit is a committed record or
a drop, so the tracer makes Probe.hits exact from the two (engine/optimizer.py), with no
``lock inc`` per hit (9 ns of some 50).

The *routine-calling* trampoline (routine_trampoline) is the shape other routines are called
from (x86/shadow.py): the routine runs with r11 = a probe id, r11 and the flags saved by the
trampoline, and the probed instruction's stack at rsp + ROUTINE_FRAME::

    lea rsp,[rsp-128]          ; step over the red zone
    pushfq
    lock inc qword [rip+C]     ; the probe's counter: Probe.hits stays exact
    push r11
    mov r11d, PROBE_ID
    call qword [rip+P]         ; P: the routine's address, a word of the counter page
    pop r11
    popfq
    lea rsp,[rsp+128]
    <the region's instructions, relocated>
    jmp region.end

The record routine (record_routine), one per process, in an r-x page of its own with the
action routine, clobbers nothing but the flags (saved by its caller)::

    reserve:  head -> rax; while head - tail < capacity: lock cmpxchg head, head+1
              full: lock inc lost; return            (a producer never blocks or waits)
    prefetch: the lines of the record PREFETCH_AHEAD records on, for writing
    write:    rdi rsi rdx rcx r8 r9, the probe id, %fs:0 (the thread's TCB pointer), rdtsc
    publish:  the commit word last: index + 1 (a plain store: x86 stores are not reordered)

Reservation is a compare-and-swap, not a ``lock xadd``: an xadd that finds the ring full has
already taken an index, and the record that index stands for would never be committed, so
the consumer would wait on it forever. A failed cmpxchg means another thread reserved: the
loop makes progress whenever any producer does.

The ring (one memfd, shared with the tracer): a HEADER_SIZE-byte header, then CAPACITY
records of RECORD_SIZE bytes; record i lives at slot i % CAPACITY and is published when its
commit word equals i + 1 (so a slot's previous lap never reads as committed).
"""
from __future__ import annotations

import struct
from typing import Any

from iced_x86 import Code, Instruction, MemoryOperand, Register

from .action import encode, encode_action, flags_restore, flags_save, red_zone_step
from .optimize import Region, Trampoline, _assemble

__all__ = [
    "RECORD",
    "RECORD_SIZE",
    "RING_HEADER",
    "RING_HEADER_SIZE",
    "RING_MAGIC",
    "RING_VERSION",
    "ROUTINE_FRAME",
    "TSC_READER",
    "PROBE_ID_OFFSET",
    "RECORD_ACTION_ROUTINE_OFFSET",
    "record_action_routine",
    "record_action_trampoline",
    "record_routine",
    "routine_trampoline",
    "argument_registers",
    "thread_key",
]

RING_MAGIC = 0x474E_4952_4250_5950  # "PYPBRING", little-endian
RING_VERSION = 1
RING_HEADER_SIZE = 256
# magic, version, record size, capacity, ns per TSC tick (double), TSC and ns of calibration;
# head, tail and lost each on a cache line of their own (producers and the consumer write them).
RING_HEADER = struct.Struct("<QQQQdQQ")
HEAD_OFFSET = 64
TAIL_OFFSET = 128
LOST_OFFSET = 192
# commit word, TSC, thread key (%fs:0), probe id, rdi rsi rdx rcx r8 r9
RECORD = struct.Struct("<QQQQ6Q")
RECORD_SIZE = RECORD.size  # 80
_TSC, _KEY, _ID, _ARGS = 8, 16, 24, 32
ARGUMENT_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")

# rdtsc; shl rdx,32; or rax,rdx; ret: the tracer's own clock for calibration (System V ABI).
TSC_READER = bytes.fromhex("0f31 48c1e220 4809d0 c3".replace(" ", ""))

# What a routine called by a routine-calling trampoline finds between its stack pointer and the
# probed instruction's: the call's return address, r11, the flags image and the red zone. A routine
# reads the probed function's return-address slot at rsp + ROUTINE_FRAME (x86/shadow.py).
ROUTINE_FRAME = 8 + 8 + 8 + 128
# In a counter page, the probe id of the record probe counting in a counter is this far past it.
PROBE_ID_OFFSET = 2048
# Records ahead of the one being written whose cache lines are prefetched (for writing):
# measured in a C copy of the routine, 2M-record ring, thread CPU time, min of 20 runs of 100K
# hits: 49.4-51.8 ns a hit without, 41.9-44.3 with.
PREFETCH_AHEAD = 8
# Where the action routine starts in the routine page (the record routine is at its start).
RECORD_ACTION_ROUTINE_OFFSET = 512


def _assemble_list(items: list, address: int) -> bytes:
    """Encode ITEMS (Instructions, or ("label", name) markers) at ADDRESS; a branch's target is
    given as a label name in ``branches``. Two passes: every branch is rel32, so lengths do not
    depend on targets."""
    labels: dict[str, int] = {}
    for final in (False, True):
        code = b""
        for item in items:
            here = address + len(code)
            if isinstance(item, tuple) and item[0] == "label":
                labels[item[1]] = here
                continue
            if isinstance(item, tuple):
                kind, name = item
                target = labels.get(name, here) if final else here
                code += encode(Instruction.create_branch(kind, target), here)
                continue
            code += encode(item, here)
    return code


def _mem(base: Register, displ: int) -> MemoryOperand:
    return MemoryOperand(base, displ=displ)


def record_routine(address: int, ring_address: int, capacity: int) -> bytes:
    """The shared record routine, placed at ADDRESS, appending to the ring at RING_ADDRESS of
    CAPACITY records (a power of two). Called with the probe id in r11 (which the caller saves)
    and the flags saved: it preserves every other register."""
    return _assemble_list(_record_items(ring_address, capacity, counted=False), address)


def record_action_routine(address: int, ring_address: int, capacity: int) -> bytes:
    """The record action's routine, placed at ADDRESS, for the ring at RING_ADDRESS of CAPACITY
    records. Called with r11 = the probe's counter (r11 saved by the caller): saves the flags,
    appends a record under the probe id found PROBE_ID_OFFSET past the counter, or counts the
    hit dropped in the counter (a hit is a committed record or a drop: Probe.hits is their
    sum); preserves every register and the flags."""
    return _assemble_list(_record_items(ring_address, capacity, counted=True), address)


def _record_items(ring_address: int, capacity: int, counted: bool) -> list:
    """The record routine's instructions (see the module docstring); COUNTED: the record action
    routine's (r11 holds the counter; the flags saved here; a drop counted in the counter too)."""
    if capacity <= 0 or capacity & (capacity - 1) or capacity >= 1 << 31:
        raise ValueError(f"ring capacity {capacity} is not a power of two below 2**31")
    R10, R11, RAX, RDX = Register.R10, Register.R11, Register.RAX, Register.RDX
    data = RING_HEADER_SIZE
    mov_store = Code.MOV_RM64_R64
    locked_cmpxchg = Instruction.create_mem_reg(Code.CMPXCHG_RM64_R64, _mem(R10, HEAD_OFFSET), R11)
    locked_cmpxchg.has_lock_prefix = True
    locked_inc = Instruction.create_mem(Code.INC_RM64, _mem(R10, LOST_OFFSET))
    locked_inc.has_lock_prefix = True
    thread_key = Instruction.create_reg_mem(Code.MOV_R64_RM64, RAX,
                                            MemoryOperand(displ=0, displ_size=8, seg=Register.FS))
    pushed_r11 = _mem(Register.RSP, 24)  # after the four pushes below
    probe_id = [Instruction.create_reg_mem(Code.MOV_R64_RM64, RDX, pushed_r11)]
    drop = [locked_inc]
    if counted:
        counter_inc = Instruction.create_mem(Code.INC_RM64, _mem(R11, 0))
        counter_inc.has_lock_prefix = True
        probe_id.append(Instruction.create_reg_mem(Code.MOV_R64_RM64, RDX, _mem(RDX, PROBE_ID_OFFSET)))
        drop = [Instruction.create_reg_mem(Code.MOV_R64_RM64, R11, pushed_r11), counter_inc, locked_inc]
    prologue, epilogue = (flags_save(), flags_restore()) if counted else ([], [])
    items = [
        *prologue,
        Instruction.create_reg(Code.PUSH_R64, R11),   # the probe id, read back below
        Instruction.create_reg(Code.PUSH_R64, RDX),
        Instruction.create_reg(Code.PUSH_R64, RAX),
        Instruction.create_reg(Code.PUSH_R64, R10),
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, R10, ring_address),
        Instruction.create_reg_mem(Code.MOV_R64_RM64, RAX, _mem(R10, HEAD_OFFSET)),
        ("label", "retry"),
        Instruction.create_reg_reg(Code.MOV_R64_RM64, R11, RAX),
        Instruction.create_reg_mem(Code.SUB_R64_RM64, R11, _mem(R10, TAIL_OFFSET)),
        Instruction.create_reg_i32(Code.CMP_RM64_IMM32, R11, capacity),
        (Code.JAE_REL32_64, "full"),
        Instruction.create_reg_mem(Code.LEA_R64_M, R11, MemoryOperand(RAX, displ=1)),
        locked_cmpxchg,                                # rax = head again when another thread won
        (Code.JNE_REL32_64, "retry"),
        # rax = our index; r11 = the record's address - data
        Instruction.create_reg_reg(Code.MOV_R64_RM64, R11, RAX),
        Instruction.create_reg_i32(Code.AND_RM64_IMM32, R11, capacity - 1),
        Instruction.create_reg_reg_i32(Code.IMUL_R64_RM64_IMM32, R11, R11, RECORD_SIZE),
        Instruction.create_reg_reg(Code.ADD_R64_RM64, R11, R10),
        # The lines of the record PREFETCH_AHEAD on, for writing: the locked instructions of
        # the hits between wait for every store before them, a store missing the cache too.
        # Past the ring's end at a wrap: a prefetch never faults.
        Instruction.create_mem(Code.PREFETCHW_M8, _mem(R11, data + PREFETCH_AHEAD * RECORD_SIZE)),
        Instruction.create_mem(Code.PREFETCHW_M8, _mem(R11, data + PREFETCH_AHEAD * RECORD_SIZE + 64)),
    ]
    for i, name in enumerate(ARGUMENT_REGISTERS):
        reg = getattr(Register, name.upper())
        if name == "rdx":  # the caller's rdx, saved above
            items.append(Instruction.create_reg_mem(Code.MOV_R64_RM64, RDX, _mem(Register.RSP, 16)))
        items.append(Instruction.create_mem_reg(mov_store, _mem(R11, data + _ARGS + 8 * i), reg))
    items += [
        *probe_id,
        Instruction.create_mem_reg(mov_store, _mem(R11, data + _ID), RDX),
        Instruction.create_reg_mem(Code.LEA_R64_M, R10, MemoryOperand(RAX, displ=1)),
        thread_key,
        Instruction.create_mem_reg(mov_store, _mem(R11, data + _KEY), RAX),
        Instruction.create(Code.RDTSC),
        Instruction.create_reg_i32(Code.SHL_RM64_IMM8, RDX, 32),
        Instruction.create_reg_reg(Code.OR_R64_RM64, RAX, RDX),
        Instruction.create_mem_reg(mov_store, _mem(R11, data + _TSC), RAX),
        Instruction.create_mem_reg(mov_store, _mem(R11, data), R10),  # publish: commit = index + 1
        (Code.JMP_REL32_64, "done"),
        ("label", "full"),
        *drop,
        ("label", "done"),
        Instruction.create_reg(Code.POP_R64, R10),
        Instruction.create_reg(Code.POP_R64, RAX),
        Instruction.create_reg(Code.POP_R64, RDX),
        Instruction.create_reg(Code.POP_R64, R11),
        *epilogue,
        Instruction.create(Code.RETNQ),
    ]
    return items


def routine_trampoline(region: Region, address: int, counter_address: int, pointer_address: int,
                       probe_id: int) -> Trampoline:
    """The routine-calling trampoline for REGION at ADDRESS: counts in COUNTER_ADDRESS and calls
    the routine whose address is the word at POINTER_ADDRESS (both within ±2 GiB) with r11 =
    PROBE_ID (below 2**32). The flags go through pushfq/popfq here (the lahf sequence would
    not leave room in a 64-byte slot for the longest region); migration finishes a thread on the
    popfq itself (Trampoline.finish_action)."""
    if not 0 <= probe_id < 1 << 32:
        raise ValueError(f"probe id {probe_id} does not fit 32 bits")
    R11 = Register.R11
    increment = Instruction.create_mem(Code.INC_RM64, MemoryOperand(Register.RIP, displ=counter_address))
    increment.has_lock_prefix = True
    call = Instruction.create_mem(Code.CALL_RM64, MemoryOperand(Register.RIP, displ=pointer_address))
    down = red_zone_step(True)
    head = [down, Instruction.create(Code.PUSHFQ), increment, Instruction.create_reg(Code.PUSH_R64, R11),
            Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.R11D, probe_id), call,
            Instruction.create_reg(Code.POP_R64, R11)]
    action = encode_action(head, address, {head.index(increment): counter_address,
                                           head.index(call): pointer_address})
    popf = len(action)  # the tail: popfq, lea rsp,[rsp+128]
    action += encode_action([Instruction.create(Code.POPFQ), red_zone_step(False)], address + popf, {})
    pushf = address + len(encode(down, address))
    return _assemble(region, address, action, ((pushf, 8),), popf)


def record_action_trampoline(region: Region, address: int, counter_address: int,
                             pointer_address: int) -> Trampoline:
    """The ``record`` trampoline for REGION at ADDRESS: calls the action routine whose address
    is the word at POINTER_ADDRESS with r11 = COUNTER_ADDRESS (both within ±2 GiB); the probe
    id is the word PROBE_ID_OFFSET past the counter."""
    R11 = Register.R11
    counter = Instruction.create_reg_mem(Code.LEA_R64_M, R11,
                                         MemoryOperand(Register.RIP, displ=counter_address))
    call = Instruction.create_mem(Code.CALL_RM64, MemoryOperand(Register.RIP, displ=pointer_address))
    items = [red_zone_step(True), Instruction.create_reg(Code.PUSH_R64, R11), counter, call,
             Instruction.create_reg(Code.POP_R64, R11), red_zone_step(False)]
    action = encode_action(items, address, {2: counter_address, 3: pointer_address})
    return _assemble(region, address, action)


def thread_key(regs: Any) -> int:
    """A thread's key in its records: %fs:0, the TCB's pointer to itself, is fs_base (glibc and
    musl keep the two equal)."""
    return regs.fs_base


def argument_registers(regs: Any) -> tuple[int, ...]:
    """The six integer argument registers of the System V ABI, as a record holds them."""
    return (regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9)
