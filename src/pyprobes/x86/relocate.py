"""Relocate a displaced instruction into a slot, and map a stepped RIP back.

A copy in a slot must behave exactly like the original at its own address:
RIP-relative operands and relative branches must reach the same absolute
targets. iced's BlockEncoder re-encodes those at the slot address; anything
else is position-independent and is copied byte for byte (exact, and immune to
the encoder choosing a different encoding or prefix order).
"""
from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import BlockEncoder, Code, Decoder, FlowControl, OpKind, Register

from ..errors import PyprobesError

from .decode import Insn

__all__ = [
    "SLOT_SIZE",
    "RelocationError",
    "SlotCode",
    "pushed_flags_fixup",
    "relocate",
    "relocate_in_trampoline",
    "return_address_fixup",
    "step_fixup",
]

# 15 bytes is the longest x86 instruction; iced may need a little more (a
# widened loop/jrcxz is 9 bytes, an EIP-relative rewrite adds a 0x67 prefix),
# and the jmp back is 5. 32 keeps slots aligned and leaves headroom.
SLOT_SIZE = 32

_MASK64 = (1 << 64) - 1
_JMP_REL32 = 0xE9
_JMP_REL32_LEN = 5
_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1
_NEAR_BRANCH_KINDS = frozenset({OpKind.NEAR_BRANCH16, OpKind.NEAR_BRANCH32, OpKind.NEAR_BRANCH64})
_UNCONDITIONAL_REL_JMPS = frozenset({Code.JMP_REL8_64, Code.JMP_REL32_64})
_CALLS = frozenset({FlowControl.CALL, FlowControl.INDIRECT_CALL})
_PUSH_RIP = b"\xff\x35"  # push qword [rip+disp32]
_PUSH_RIP_LEN = 6
_RETURN_WORD = 8


class RelocationError(PyprobesError, ValueError):
    """The instruction cannot run from this slot (a target out of reach, or no room)."""


@dataclass(frozen=True)
class SlotCode:
    """What goes into a slot for one probed instruction.

    ``exits`` maps a slot offset at which a single-step can stop to the
    original address execution continues at: the end of the copy maps to
    ``resume_address``, and a widened short branch (loop/jrcxz) adds its
    internal fall-through and taken stubs.
    """

    code: bytes
    copy_length: int
    resume_address: int
    exits: tuple[tuple[int, int], ...] = ()


def _is_relative_branch(instruction) -> bool:
    return any(instruction.op_kind(n) in _NEAR_BRANCH_KINDS for n in range(instruction.op_count))


def _memory_target(instruction) -> int | None:
    """Absolute address of a RIP/EIP-relative or absolute memory operand, else None."""
    if instruction.is_ip_rel_memory_operand:
        return instruction.ip_rel_memory_address
    # iced turns a RIP-relative operand into an absolute [disp32] when the
    # target fits a sign-extended 32 bits and the slot is far away.
    if (instruction.memory_base == Register.NONE and instruction.memory_index == Register.NONE
            and any(instruction.op_kind(n) == OpKind.MEMORY for n in range(instruction.op_count))):
        return instruction.memory_displacement & _MASK64
    return None


def _rel32(source_next: int, target: int) -> int | None:
    delta = target - source_next
    if _INT32_MIN <= delta <= _INT32_MAX:
        return delta
    return None


def _describe(insn: Insn) -> str:
    return f"'{insn.text}' at {insn.address:#x}"


def relocate(insn: Insn, slot_address: int, boosted: bool) -> SlotCode:
    """Build the slot code that executes INSN at SLOT_ADDRESS.

    When BOOSTED, a ``jmp rel32`` back to the instruction after INSN follows the
    copy so the thread needs no single-step. Raises RelocationError when a
    target is beyond the reach of the slot, when a call would run boosted, or
    when the result would not fit in SLOT_SIZE.
    """
    instruction = insn.instruction
    if instruction.code == Code.INVALID:
        raise RelocationError(f"cannot relocate invalid bytes at {insn.address:#x}")
    if boosted and instruction.flow_control in _CALLS:
        # Boosting a call leaves a return address into the slot on the stack,
        # which would outlive the slot: invariant 2 of docs/ARCHITECTURE.md.
        raise RelocationError(f"{_describe(insn)} is a call: it must never run boosted")
    resume = insn.address + insn.length

    branch = _is_relative_branch(instruction)
    if branch:
        target = instruction.near_branch_target
        # Require rel32 reach so iced widens at most to a rel32 form; beyond
        # it iced emits "jmp [rip]" plus an inline 8-byte target, whose layout
        # the step fix-up could not map. Slots live near their module anyway.
        if _rel32(slot_address + SLOT_SIZE, target) is None or _rel32(slot_address, target) is None:
            raise RelocationError(
                f"branch target {target:#x} of {_describe(insn)} is beyond ±2 GiB of slot "
                f"{slot_address:#x}: map the slot page near the module")
        copy = _encode_at(insn, slot_address)
    elif instruction.is_ip_rel_memory_operand:
        copy = _encode_at(insn, slot_address)
        _check_memory_target(insn, copy, slot_address)
    else:
        copy = insn.raw

    copy_length = len(copy)
    code = copy
    if boosted:
        back = _rel32(slot_address + copy_length + _JMP_REL32_LEN, resume)
        if back is None:
            raise RelocationError(
                f"slot {slot_address:#x} is beyond ±2 GiB of {resume:#x}: the jmp back after "
                f"{_describe(insn)} cannot reach it")
        code = copy + bytes((_JMP_REL32,)) + back.to_bytes(4, "little", signed=True)
    if len(code) > SLOT_SIZE:
        raise RelocationError(
            f"relocated {_describe(insn)} needs {len(code)} bytes, more than a {SLOT_SIZE}-byte slot")

    if branch:
        exits = _exits(copy, slot_address, resume)
        # The target must be reached either by the copy itself or by a stub.
        first = Decoder(64, copy, ip=slot_address).decode()
        if first.near_branch_target != target and all(t != target for _, t in exits):
            raise RelocationError(f"relocated {_describe(insn)} lost its branch target {target:#x}")
    else:
        exits = ((copy_length, resume),)
    if instruction.flow_control in _CALLS:
        # return_address_fixup assumes the call is the whole copy, so the
        # pushed address is slot + copy_length.
        first = Decoder(64, copy, ip=slot_address).decode()
        if first.len != copy_length:
            raise RelocationError(f"relocated {_describe(insn)} is not a single call instruction")
    return SlotCode(code=code, copy_length=copy_length, resume_address=resume, exits=exits)


def relocate_in_trampoline(insn: Insn, address: int) -> bytes:
    """INSN re-encoded to run at ADDRESS in a jump-optimised probe's trampoline, with the effect
    it has at its own address: relocate()'s copy (RIP-relative operands re-targeted, a short
    branch widened), except for a direct ``call``, which becomes::

        push qword [rip+W]    ; W: the word below, the call's own return address
        jmp target
        W: dq insn.address + insn.length

    so the callee returns to the original code after the call, exactly as it would have: an
    unwinder, a backtrace or a return probe sees the original return address, and no return
    address into the trampoline is left on a stack (the trampoline can be freed while the
    callee runs). No register or flag is touched. The thread is at the call's original state
    on the push (Trampoline.relocated maps it there); between the push and the jmp it has no
    original equivalent and must run on through the jmp (the optimizer steps it). The word
    after the jmp is never executed. Raises RelocationError when a target is beyond ±2 GiB."""
    if insn.instruction.code != Code.CALL_REL32_64:
        return relocate(insn, address, boosted=False).code
    target = insn.instruction.near_branch_target
    jmp_at = address + _PUSH_RIP_LEN
    rel = _rel32(jmp_at + _JMP_REL32_LEN, target)
    if rel is None:
        raise RelocationError(f"call target {target:#x} of {_describe(insn)} is beyond ±2 GiB of "
                              f"the trampoline at {address:#x}: map it near the module")
    return (_PUSH_RIP + _JMP_REL32_LEN.to_bytes(4, "little")   # W is just past the 5-byte jmp
            + bytes((_JMP_REL32,)) + rel.to_bytes(4, "little", signed=True)
            + (insn.address + insn.length).to_bytes(_RETURN_WORD, "little"))


def _encode_at(insn: Insn, slot_address: int) -> bytes:
    copy = insn.instruction.copy()
    # Targets and RIP-relative addresses are stored absolute in the decoded
    # instruction, so its IP only serves BlockEncoder to recognise branches
    # *into the block*. With the original IP, a branch to itself ("loop $",
    # "jmp $") would be kept inside the slot instead of going back to the
    # probed address; the slot's own address can never be an original target.
    copy.ip = slot_address
    encoder = BlockEncoder(64)
    encoder.add(copy)
    try:
        return encoder.encode(slot_address)
    except ValueError as exc:
        target = insn.instruction.ip_rel_memory_address if insn.instruction.is_ip_rel_memory_operand else None
        where = f" (operand at {target:#x}, {target - slot_address:+#x} from the slot)" if target is not None else ""
        raise RelocationError(
            f"cannot re-encode {_describe(insn)} for slot {slot_address:#x}{where}: "
            f"a RIP-relative target must be within ±2 GiB of the slot; {exc}") from exc


def _check_memory_target(insn: Insn, copy: bytes, slot_address: int) -> None:
    # iced may rewrite a far RIP-relative operand as an absolute or
    # EIP-relative one when the target allows it; make sure that whatever it
    # chose still reaches the original address.
    relocated = Decoder(64, copy, ip=slot_address).decode()
    want = insn.instruction.ip_rel_memory_address
    got = _memory_target(relocated)
    if relocated.len != len(copy) or got != want:
        got_text = "nothing" if got is None else f"{got:#x}"
        raise RelocationError(
            f"relocated {_describe(insn)} addresses {got_text} instead of {want:#x}")


def _exits(copy: bytes, slot_address: int, resume: int) -> tuple[tuple[int, int], ...]:
    """Where a single-step of a relocated branch can stop, mapped to original addresses.

    BlockEncoder widens a short-only branch (loop, jrcxz) to
    ``loop L1; jmp short END; L1: jmp rel32 target``. After one step the thread
    is on one of those stubs; each is a plain jmp, so it maps to its final
    destination.
    """
    end = slot_address + len(copy)
    decoded = {i.ip: i for i in Decoder(64, copy, ip=slot_address)}

    def resolve(address: int, hops: int = 0) -> int | None:
        if address == end:
            return resume
        if not slot_address <= address < end:
            return address
        stub = decoded.get(address)
        if stub is None or stub.code not in _UNCONDITIONAL_REL_JMPS or hops > len(decoded):
            return None
        return resolve(stub.near_branch_target, hops + 1)

    exits = [(len(copy), resume)]
    for address in decoded:
        if address == slot_address:
            continue  # the branch itself: a step never stops before it ran
        destination = resolve(address)
        if destination is not None:
            exits.append((address - slot_address, destination))
    return tuple(sorted(exits))


def step_fixup(insn: Insn, slot: SlotCode, slot_address: int, rip_after_step: int) -> int:
    """Where RIP belongs in original code after single-stepping SLOT.

    The end of the copy maps to the instruction after INSN, and a widened
    branch's stubs to their targets. Any other RIP is returned unchanged: a
    taken branch, indirect jump or ret already holds an absolute target, and
    RIP still at ``slot_address`` means the instruction has not finished (a
    rep string instruction between iterations, or a fault), so the caller
    steps again or handles the fault.
    """
    offset = rip_after_step - slot_address
    for exit_offset, original in slot.exits:
        if exit_offset == offset:
            return original
    if offset == slot.copy_length:
        return slot.resume_address
    return rip_after_step


def return_address_fixup(insn: Insn, slot_address: int, slot: SlotCode) -> tuple[int, int] | None:
    """For a call stepped in SLOT: (the return address it pushed, the one it should have).

    The caller reads [rsp] after the step, checks it equals the first value
    and writes the second. None when INSN is not a near call.
    """
    if insn.instruction.flow_control not in _CALLS:
        return None
    return (slot_address + slot.copy_length, insn.address + insn.length)


def pushed_flags_fixup(insn: Insn) -> int:
    """Width in bytes of the RFLAGS image a stepped pushf left at [rsp], else 0.

    The single-step runs with TF set, so pushf stores TF in the image; the
    caller must clear bit 8 (0x100) there, as the kernel's resume_execution()
    does. A boosted pushf runs without TF and needs nothing.
    """
    code = insn.instruction.code
    if code == Code.PUSHFQ:
        return 8
    if code == Code.PUSHFW:
        return 2
    return 0
