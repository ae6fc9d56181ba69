"""Decide how a probe executes the instruction it displaces.

Each hit on a probe must still execute the original instruction. There are
four answers:

* EMULATE: the tracer performs its effect itself: one ptrace stop and no
  slot. Only for what is no more work than boosting (a relative jmp or jcc, a
  nop: RIP alone, or RIP from RFLAGS) and for ``call rel32``, whose copy
  cannot run in a slot (it would push a return address inside the slot).
* BOOST: a copy runs in a slot followed by ``jmp`` back: one stop, and per hit
  just RIP read and rewritten. This includes ``push reg`` and ``ret``:
  emulating them costs a GETREGS, a memory access and a SETREGS more per hit
  (measured: ~23 vs ~18.5 us even for a C tracer), which is why the kernel's
  kprobes boosts push (uprobes emulates it only because it cannot boost). A
  boosted ``ret`` leaves the slot straight for its return address; nothing it
  leaves behind points into the slot.
* STEP: the copy is single-stepped in the slot and RIP fixed up: two stops,
  and the tracer is in control right after the instruction.
* REFUSE: no probe can be put there.

The rules follow the kernel's kprobes ``can_boost()`` and uprobes' emulation
and refusal tables, adapted to user space: a thread can only be in a boosted
slot for one instruction plus a ``jmp``, and the tracer can stop every thread,
so what matters is what the copy does *outside* the slot: a return address,
a saved RIP, a trap or a partial execution that points into the slot.
Every rule below carries the reason a user sees when it applies.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from iced_x86 import Code, FlowControl, Mnemonic

from .decode import Insn

__all__ = ["Classification", "Kind", "classify", "legacy_prefixes"]


class Kind(str, Enum):
    REFUSE = "refused"
    EMULATE = "emulated"
    STEP = "stepped"
    BOOST = "boosted"


@dataclass(frozen=True)
class Classification:
    kind: Kind
    reason: str


def _codes(pattern: str) -> frozenset[int]:
    rx = re.compile(pattern)
    return frozenset(getattr(Code, name) for name in dir(Code) if rx.fullmatch(name))


# --- instruction sets -------------------------------------------------------
# Built from iced's Code names so no form (rel8/rel32, every condition) is
# forgotten. Only the 64-bit-operand forms are emulated: 16/32-bit forms cannot
# be decoded in 64-bit mode or carry an operand-size prefix (refused below).
# Emulated: what changes RIP alone (no more ptrace work than boosting), and
# call rel32 (a copy would push a return address in the slot). push reg and
# ret are boosted: emulating them would read all registers, touch memory and
# write all registers back on every hit, two system calls more than a boost.
JMP_REL_CODES = frozenset({Code.JMP_REL8_64, Code.JMP_REL32_64})
JCC_CODES = _codes(r"J(O|NO|B|AE|E|NE|BE|A|S|NS|P|NP|L|GE|LE|G)_REL(8|32)_64")
CALL_REL_CODES = frozenset({Code.CALL_REL32_64})
RET_CODES = frozenset({Code.RETNQ, Code.RETNQ_IMM16})  # boosted, see classify()
NOP_CODES = frozenset({
    Code.NOPD, Code.NOPW, Code.NOPQ,             # 90, 66 90, 48 90
    Code.NOP_RM16, Code.NOP_RM32, Code.NOP_RM64,  # 0f 1f /0, any length
    Code.ENDBR64, Code.ENDBR32,                   # nops unless IBT is on
})
EMULATED_CODES = JMP_REL_CODES | JCC_CODES | CALL_REL_CODES | NOP_CODES

_FAR_CALL = frozenset({Code.CALL_M1616, Code.CALL_M1632, Code.CALL_M1664,
                       Code.CALL_PTR1616, Code.CALL_PTR1632})
_FAR_JMP = frozenset({Code.JMP_M1616, Code.JMP_M1632, Code.JMP_M1664,
                      Code.JMP_PTR1616, Code.JMP_PTR1632})
_FAR_RET = _codes(r"RETF[WDQ](_IMM16)?")
_SYSCALLS = frozenset({Mnemonic.SYSCALL, Mnemonic.SYSENTER, Mnemonic.SYSEXIT,
                       Mnemonic.SYSEXITQ, Mnemonic.SYSRET, Mnemonic.SYSRETQ})
_IRET = frozenset({Mnemonic.IRET, Mnemonic.IRETD, Mnemonic.IRETQ})
_UD = frozenset({Mnemonic.UD0, Mnemonic.UD1, Mnemonic.UD2})
_TSX = frozenset({Mnemonic.XBEGIN, Mnemonic.XEND, Mnemonic.XABORT})
_X87_STATE = frozenset({
    Mnemonic.FLDENV, Mnemonic.FRSTOR, Mnemonic.FXRSTOR, Mnemonic.FXRSTOR64,
    Mnemonic.XRSTOR, Mnemonic.XRSTOR64, Mnemonic.XRSTORS, Mnemonic.XRSTORS64,
    Mnemonic.FLDCW, Mnemonic.FNINIT, Mnemonic.FINIT, Mnemonic.FNCLEX,
    Mnemonic.FCLEX, Mnemonic.FNSAVE, Mnemonic.FSAVE, Mnemonic.FNSTENV,
    Mnemonic.FSTENV,
})
_MOV_SS = frozenset({Code.MOV_SREG_R32M16, Code.MOV_SREG_R64M16, Code.MOV_SREG_RM16,
                     Code.POPD_SS, Code.POPW_SS})

_LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
_PREFIX_CS = 0x2E
_PREFIX_OPSIZE = 0x66
_PREFIX_ADDRSIZE = 0x67


def legacy_prefixes(raw: bytes) -> bytes:
    """The legacy prefix bytes at the start of an encoding (REX and opcode excluded).

    iced folds some prefixes away (a CS override is ignored in 64-bit mode, a
    66 on a near branch is ignored by Intel), but the rules below care about
    the bytes themselves, as the kernel's can_boost() does.
    """
    n = 0
    while n < len(raw) and raw[n] in _LEGACY_PREFIXES:
        n += 1
    return raw[:n]


def _rex_w(raw: bytes, prefix_length: int) -> bool:
    """Whether a REX prefix with W=1 follows the legacy prefixes."""
    return prefix_length < len(raw) and (raw[prefix_length] & 0xF8) == 0x48


_BRANCHING = frozenset({
    FlowControl.UNCONDITIONAL_BRANCH, FlowControl.INDIRECT_BRANCH,
    FlowControl.CONDITIONAL_BRANCH, FlowControl.RETURN, FlowControl.CALL,
    FlowControl.INDIRECT_CALL,
})

_BOOST = Classification(Kind.BOOST, "runs as a copy in the slot followed by a jmp back")
_BOOST_RET = Classification(
    Kind.BOOST, "ret: runs as a copy in the slot and leaves it straight for its return "
    "address (cheaper than emulating: no registers or memory read by the tracer)")
_BOOST_RIPREL = Classification(
    Kind.BOOST, "runs as a copy in the slot with its RIP-relative operand re-targeted, then a jmp back")


def classify(insn: Insn) -> Classification:
    """Say how a probe on INSN executes it, and why."""
    i = insn.instruction
    code = i.code
    mnemonic = i.mnemonic
    flow = i.flow_control
    prefixes = legacy_prefixes(insn.raw)

    # --- refuse -------------------------------------------------------------
    if code == Code.INVALID:
        return _refuse("invalid: these bytes do not decode as an x86-64 instruction "
                       "(data in text, or not an instruction boundary)")
    if code == Code.INT3:
        return _refuse("int3 would re-trap: it is another breakpoint (a debugger's or "
                       "the program's own) and its trap could not be told from the probe's")
    if code == Code.INT_IMM8:
        return _refuse("int n raises a software interrupt (int 0x80 is a system call): "
                       "the kernel would see and return to the slot's RIP")
    if code == Code.INT1:
        return _refuse("int1 (icebp) raises a debug trap the tracer would take for a single-step")
    if code == Code.INTO:
        return _refuse("into raises an overflow trap whose saved RIP would point into the slot")
    if mnemonic in _SYSCALLS:
        return _refuse("syscall: the kernel returns to the slot's RIP (and saves it in rcx), "
                       "and a restarted system call would re-enter from the slot")
    if i.is_privileged:
        return _refuse("privileged instruction (ring 0 or I/O privilege): it faults in user "
                       "space, and the fault would be reported inside the slot")
    if mnemonic in _IRET:
        return _refuse("iret reloads RIP, CS, RFLAGS, RSP and SS from the stack: it would drop "
                       "the trap flag and can switch code segment")
    if mnemonic in _UD:
        return _refuse("ud0/ud1/ud2 raise #UD on purpose (an assertion or an unreachable "
                       "marker): the SIGILL would point into the slot")
    if mnemonic in _TSX:
        return _refuse("xbegin/xend/xabort: a hardware transaction aborts on any trap, so "
                       "every probe hit would abort it and change the program's path")
    if code in _MOV_SS:
        return _refuse("mov/pop ss inhibits the debug trap for one instruction: a single-step "
                       "would run on past the copy into whatever follows it in the slot")
    if code in _FAR_CALL:
        return _refuse("far call pushes CS and a return address that would point into the "
                       "slot, in a layout set by its operand size, and may switch code "
                       "segment; not supported")
    if flow in _BRANCHING and _PREFIX_OPSIZE in prefixes and not _rex_w(insn.raw, len(prefixes)):
        # REX.W overrides 0x66 on every CPU, so the TLS call sequence
        # "data16 data16 rex.W call __tls_get_addr" is an ordinary call.
        return _refuse("operand-size prefix (0x66) on a branch: Intel ignores it but AMD "
                       "truncates the target to 16 bits with a shorter encoding, so its "
                       "effect depends on the CPU (uprobes refuses it too)")

    # --- emulate ------------------------------------------------------------
    # Before the prefix rules: gcc pads with "cs nopw", and hint prefixes
    # (2e/3e on jcc, f2 "bnd") do not change what these do.
    if code in EMULATED_CODES:
        if code in NOP_CODES:
            if code in (Code.ENDBR64, Code.ENDBR32):
                return _emulate("endbr: a nop for execution; the tracer just advances RIP")
            return _emulate("nop: the tracer just advances RIP")
        if code in JMP_REL_CODES:
            return _emulate("relative jmp: the tracer sets RIP to its fixed target")
        if code in JCC_CODES:
            return _emulate("conditional jump: the tracer evaluates the condition from "
                            "RFLAGS and sets RIP to the target or the next instruction")
        return _emulate("call rel32: emulated so the pushed return address is the "
                        "original one (a copied call would push an address in the slot)")

    # --- step ---------------------------------------------------------------
    if i.is_loop or i.is_loopcc or i.is_jcx_short:
        return _step("loop/jrcxz: only a rel8 form exists, so the slot holds a widened "
                     "3-instruction sequence; stepped as the kernel does (can_boost refuses "
                     "e0-e3), and the exit it took is mapped back")
    if i.is_call_near_indirect:
        return _step("indirect call: it would push a return address inside the slot; "
                     "step it and rewrite the pushed address to the original one")
    if i.is_jmp_near_indirect:
        return _step("indirect jmp: the target is computed at run time, step it")
    if code in _FAR_JMP or code in _FAR_RET:
        return _step("far jmp/ret loads CS and may switch the code segment: step it so the "
                     "tracer sees where it went (the target is absolute, nothing to fix)")
    if i.has_lock_prefix:
        return _step("lock prefix: never boosted, as in the kernel's can_boost(); it may carry "
                     "xacquire/xrelease hints that start or end a hardware transaction")
    if i.is_string_instruction and (i.has_rep_prefix or i.has_repne_prefix):
        return _step("rep prefix: a string instruction can be interrupted mid-way and "
                     "re-executed, so a thread could stay in the slot for many steps")
    if mnemonic in _X87_STATE:
        return _step("x87 state change: loads or resets the FPU control/status words, which "
                     "can leave an x87 exception pending; never boosted, as in the kernel")
    if _PREFIX_ADDRSIZE in prefixes:
        return _step("address-size prefix (0x67): 32-bit address arithmetic (an EIP-relative "
                     "operand, ecx as a counter) wraps at 4 GiB; never boosted, as in the "
                     "kernel's can_boost()")
    if _PREFIX_CS in prefixes:
        return _step("CS segment prefix: never boosted, as in the kernel's can_boost(); "
                     "stepped conservatively")
    if code in RET_CODES:
        # As the kernel's can_boost() allows: the copy pops the return address and
        # leaves the slot for it, so the jmp back is never reached and nothing the
        # thread leaves behind (stack, registers) points into the slot. Stepped (a
        # probe with boost=False, or a post-handler), RIP lands on the return address
        # outside the slot and step_fixup() leaves it alone.
        return _BOOST_RET
    if flow != FlowControl.NEXT:
        # Safety net: a control transfer no rule above names. A call of any
        # form other than rel32 must never run boosted (its return address
        # would point into the slot), and an unknown branch is safer stepped.
        if flow in (FlowControl.CALL, FlowControl.INDIRECT_CALL):
            return _step("call: a copied call would push a return address in the slot; "
                         "step it and rewrite the pushed address")
        if flow in (FlowControl.INTERRUPT, FlowControl.EXCEPTION):
            return _refuse("raises an interrupt or exception whose saved RIP would point "
                           "into the slot")
        return _step("control transfer without a specific rule: step it")

    # --- boost --------------------------------------------------------------
    if i.is_ip_rel_memory_operand:
        return _BOOST_RIPREL
    return _BOOST


def _refuse(reason: str) -> Classification:
    return Classification(Kind.REFUSE, reason)


def _emulate(reason: str) -> Classification:
    return Classification(Kind.EMULATE, reason)


def _step(reason: str) -> Classification:
    return Classification(Kind.STEP, reason)

