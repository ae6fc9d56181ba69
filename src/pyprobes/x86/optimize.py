"""Jump-optimised probes (issue 11): the region a 5-byte ``jmp`` may replace, its trampoline, the patch.

The kernel's optprobes (arch/x86/kernel/kprobes/opt.c) in user space. A probe whose action
runs inside the tracee replaces whole instructions at the probe address with ``jmp rel32``
to a *trampoline*: the action, then those instructions relocated, then ``jmp`` back to the
first instruction after them. No stop per hit.

What may be replaced (find_region), and why each rule holds:

* A leading ``endbr64`` at the function's entry is skipped, as the int3 path emulates it
  away: the region starts after it, so a caller's ``call`` (direct or indirect, IBT or not)
  still lands on the endbr64 and falls into the ``jmp``.
* Whole instructions covering at least 5 bytes from the region start, inside the function.
* Each one runs unchanged from the trampoline: a boostable instruction (classify.py), with a
  RIP-relative operand re-targeted, or a direct ``jcc``/``jmp`` (relocation re-encodes it
  at the trampoline with the same target, a rel8 widened to rel32) or a near ``ret``. A
  ``jmp`` or ``ret`` must be the region's last instruction: bytes after it would be reached
  only by what no sweep sees (a landing pad, a jump-table entry); the trampoline's final
  jmp is then never reached. A direct ``call rel32`` is allowed too, always as the last
  instruction (it is 5 bytes long): relocate_in_trampoline makes it ``push`` of the original
  return address (region.end) and ``jmp`` to the callee, which returns to the original code.
  Refused: an indirect ``call`` (a ``call rax`` may be followed by more region
  instructions), ``syscall``, ``int n``, ``int3``, indirect branches, ``loop``/``jrcxz``
  (short-only) and ``xbegin``.
* No branch of the function (jmp, jcc, call, loop, xbegin) targets the region past its first
  byte, and no RIP-relative operand takes such an address: those bytes are now the ``jmp``'s
  displacement. A branch to the first byte is fine: it takes the ``jmp``.
* No ``endbr64`` inside the region past its first byte: it marks an indirect-branch target.
* No indirect ``jmp`` in the function (the kernel's can_optimize() rule), unless find_region
  is given the module's data (READ_DATA) and each is a switch dispatch jumptable.py recognises:
  then every table entry counts as a branch target.

Not checked by find_region: branches from *other* symbols (gcc's ``NAME.cold`` parts jump
back into NAME; hand-written libc jumps between functions: mempcpy ends in ``jmp memcpy+3``).
reached_addresses() sweeps a whole module's code for the engine to check those; C++ landing
pads (.gcc_except_table; none can be inside an entry region: a pad follows a call or code
that does not fall through, and the region holds neither before its last instruction), and
threads or return addresses inside the region at patch time (issue 11, "Patching").

The trampoline of the ``count`` action (count_trampoline)::

    lea rsp,[rsp-128]          ; step over the red zone (lea leaves the flags alone)
    push rax
    seto al                    ; the flags lock inc changes: OF in al,
    lahf                       ;   SF ZF AF PF (and CF) in ah
    lock inc qword [rip+C]     ; the probe's counter
    add al,0x7f                ; OF back (1 + 0x7f overflows, 0 + 0x7f does not)
    sahf                       ; SF ZF AF PF CF back
    pop rax
    lea rsp,[rsp+128]
    <the region's instructions, relocated>
    jmp region.end

The flags are saved with lahf/seto, not pushfq/popfq: see action.py.

The patch (jump_patch) is ``jmp rel32`` followed by ``int3`` up to region.end. The kernel
writes only the 5 bytes of its jmp and leaves the tails of the displaced instructions
behind it; we pad with int3 so that a stray jump into the region (one the rules above could
not see) traps at a known address instead of running the tail of an instruction as code,
and so that the patched bytes decode as ``jmp; int3...`` for anyone who reads them. Nops
would be worse than either: a stray jump would slide silently over instructions that
never ran.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from iced_x86 import Code, Decoder, FlowControl, Instruction, MemoryOperand, OpKind, Register

from .action import RED_ZONE, encode_action, flags_restore, flags_save, red_zone_step, rel32
from .classify import NOP_CODES, Kind, classify
from .decode import Insn, MidInstructionError, decode_function
from .jumptable import ReadData, reached_addresses, switches
from .relocate import RelocationError, pushed_flags_fixup, relocate_in_trampoline

if TYPE_CHECKING:
    from .arch import StackMemory, ThreadRegisters

__all__ = [
    "JMP_REL32_LENGTH",
    "RED_ZONE",
    "TRAMPOLINE_SLOT_SIZE",
    "Refusal",
    "RefusalKind",
    "Region",
    "Trampoline",
    "count_trampoline",
    "find_region",
    "jump_patch",
    "stack_words",
    "reached_addresses",
]

JMP_REL32_LENGTH = 5
ENDBR64_LENGTH = 4
_INT3 = 0xCC
_JMP_REL32 = 0xE9
_MAX_INSTRUCTION = 15
# A count trampoline is at most 31 (action) + 12 + 15 (a region: instructions of at most 4
# bytes before one of at most 15; relocation keeps lengths but widens a 2-byte jcc to 6, so
# 4 bytes grow to 12 at most) + 5 (jmp back) = 63 bytes, or 31 + 12 + 19 = 62 when the region
# ends in a call (push, jmp and an 8-byte word; nothing runs on after it, so no jmp back):
# one 64-byte slot.
TRAMPOLINE_SLOT_SIZE = 64
_TRAP_FLAG = 0x100  # RFLAGS.TF
_STACK_WORD = 8
_NEAR_BRANCH_KINDS = frozenset({OpKind.NEAR_BRANCH16, OpKind.NEAR_BRANCH32, OpKind.NEAR_BRANCH64})


class RefusalKind(str, Enum):
    """Which rule refused a region: stable keys for statistics; the reason text is for people."""

    NO_SIZE = "no-size"                  # the function's size is unknown
    UNDECODABLE = "undecodable"          # invalid bytes: boundaries and branches unknown
    TOO_SHORT = "too-short"              # fewer than 5 bytes before the function's end
    CONTROL_FLOW = "control-flow"        # a call, syscall, indirect jmp... in the region
    NOT_RELOCATABLE = "not-relocatable"  # classify() does not boost it
    BRANCH_INTO = "branch-into"          # a direct branch targets the region past its first byte
    ADDRESS_INTO = "address-into"        # a RIP-relative operand takes such an address
    ENDBR_INSIDE = "endbr-inside"        # an endbr64 (indirect-branch target) in the region
    INDIRECT_JUMP = "indirect-jump"      # the function has a jmp through a register or memory


@dataclass(frozen=True)
class Refusal:
    """Why no jump fits at a probe address; the probe stays a breakpoint."""

    kind: RefusalKind
    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Region:
    """The bytes [start, end) a ``jmp rel32`` replaces, and the whole instructions they hold.

    ``skipped`` is the length of the ``endbr64`` left in place before ``start`` (0 or 4): the
    probe address is ``start - skipped``.
    """

    start: int
    end: int
    instructions: tuple[Insn, ...]
    skipped: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def probe_address(self) -> int:
        return self.start - self.skipped


@dataclass(frozen=True)
class Trampoline:
    """Code to place at ``address``: the action, the region's instructions relocated, a jmp back.

    ``relocated`` pairs each relocated instruction's address in the trampoline with its
    original address, in order; ``relocated_offset`` is where that part begins. A thread
    found before it is inside the action and must run (be stepped) out of it; a thread on a
    relocated instruction or on the final jmp is at an original address (original_address).
    """

    address: int
    code: bytes
    relocated_offset: int
    relocated: tuple[tuple[int, int], ...]
    return_jump: int     # the address of the final jmp, in the trampoline
    resume_address: int  # where it jumps: region.end
    # Instructions of the trampoline that push the flags: address -> width of the image.
    flag_pushes: tuple[tuple[int, int], ...] = ()
    # The action's popfq (from here on the hit is counted: finish_action's point); None when
    # the action has none (it saves the flags with lahf) and is single-stepped through.
    counted_offset: int | None = None

    @property
    def end(self) -> int:
        return self.address + len(self.code)

    def original_address(self, rip: int) -> int | None:
        """The original address equivalent to RIP in the trampoline, or None (in the action,
        between instruction boundaries, or outside the trampoline)."""
        if rip == self.return_jump:
            return self.resume_address
        for here, original in self.relocated:
            if here == rip:
                return original
        return None

    def in_action(self, rip: int) -> bool:
        """Whether RIP is in the action part (the hit is not counted or its frame not undone)."""
        return self.address <= rip < self.address + self.relocated_offset

    def finish_action(self, thread: Any, memory: "StackMemory", tid: int, rip: int) -> bool:
        """For a stopped thread at RIP in the action past its counter's increment: do what the
        rest of the action would (flags from the pushed image, RSP back over it and the red zone)
        and put it on the first relocated instruction. False when RIP is not there (the caller
        single-steps on). The popfq is never single-stepped: the kernel treats a stepped popf as
        setting TF itself and leaves TF set once the thread runs on."""
        if self.counted_offset is None:
            return False
        popf = self.address + self.counted_offset
        if rip not in (popf, popf + 1):
            return False
        regs = thread.get_regs(tid)
        if rip == popf:
            regs.eflags = memory.read_u64(regs.rsp) & ~_TRAP_FLAG
            regs.rsp += 8
        regs.rsp += RED_ZONE
        regs.rip = self.address + self.relocated_offset
        thread.set_regs(tid, regs)
        return True

    def after_step(self, thread: "ThreadRegisters", memory: "StackMemory", tid: int,
                   stepped: int) -> None:
        """After single-stepping the instruction at STEPPED here: a flags image it pushed holds
        TF (the step's), which a popf would load: clear it (the kernel's resume_execution)."""
        for here, width in self.flag_pushes:
            if here == stepped:
                rsp = thread.get_reg(tid, "rsp")
                image = int.from_bytes(memory.read(rsp, width), "little") & ~_TRAP_FLAG
                memory.write(rsp, image.to_bytes(width, "little"))


class _Scan:
    """What the region check needs from one pass over the whole function."""

    __slots__ = ("boundaries", "branches", "addresses", "endbrs", "jumps", "invalid")

    def __init__(self) -> None:
        self.boundaries: list[int] = []
        self.branches: list[tuple[int, int]] = []    # (instruction address, target)
        self.addresses: list[tuple[int, int]] = []   # (instruction address, RIP-relative target)
        self.endbrs: list[int] = []
        self.jumps: list[int] = []                    # every indirect jmp: index in boundaries
        self.invalid: int | None = None


def _scan(code: bytes, address: int) -> _Scan:
    scan = _Scan()
    decoder = Decoder(64, code, ip=address)
    # One reused Instruction and no formatting: this runs over whole functions (tens of KB
    # for an interpreter loop), and only the few region instructions need an Insn.
    insn = Instruction()
    boundaries = scan.boundaries
    while decoder.can_decode:
        decoder.decode_out(insn)
        ip = insn.ip
        boundaries.append(ip)
        code_ = insn.code
        if code_ == Code.INVALID:
            if scan.invalid is None:
                scan.invalid = ip
            continue
        if code_ == Code.ENDBR64:
            scan.endbrs.append(ip)
        if insn.op0_kind in _NEAR_BRANCH_KINDS:
            scan.branches.append((ip, insn.near_branch_target))
        elif insn.flow_control == FlowControl.INDIRECT_BRANCH:
            scan.jumps.append(len(boundaries) - 1)
        if insn.is_ip_rel_memory_operand:
            scan.addresses.append((ip, insn.ip_rel_memory_address))
    return scan


def _text_of(code: bytes, function_address: int, address: int) -> str:
    offset = address - function_address
    return decode_function(code[offset:offset + _MAX_INSTRUCTION], address)[0].text


def find_region(code: bytes, function_address: int, function_size: int,
                probe_address: int, read_data: ReadData | None = None) -> Region | Refusal:
    """The region a ``jmp rel32`` may replace for a probe at PROBE_ADDRESS, or why none fits.

    CODE holds the function's bytes from FUNCTION_ADDRESS (as loaded, breakpoints removed);
    FUNCTION_SIZE bytes of it are decoded (the symbol size: the whole function must be seen to
    find every branch into the region). Raises ValueError when PROBE_ADDRESS is outside the
    function or CODE is shorter than FUNCTION_SIZE, MidInstructionError when PROBE_ADDRESS is
    not an instruction boundary. READ_DATA(address, size) reads the module (same addresses as
    CODE): switch tables are read with it; without it, any indirect jmp refuses.
    """
    if function_size <= 0:
        return Refusal(RefusalKind.NO_SIZE, "the function's size is unknown, so its branches "
                       "into the patched bytes cannot all be found")
    function_end = function_address + function_size
    if not function_address <= probe_address < function_end:
        raise ValueError(f"{probe_address:#x} is outside the function at "
                         f"{function_address:#x}..{function_end:#x}")
    if len(code) < function_size:
        raise ValueError(f"{len(code)} bytes of code given for a {function_size}-byte function")
    code = bytes(code[:function_size])
    scan = _scan(code, function_address)
    if scan.invalid is not None:
        return Refusal(RefusalKind.UNDECODABLE, f"the bytes at {scan.invalid:#x} do not decode "
                       "as an instruction, so the function's branches cannot all be found")

    boundaries = scan.boundaries
    index = _boundary_index(boundaries, probe_address)
    skipped = 0
    if probe_address == function_address and scan.endbrs[:1] == [function_address]:
        skipped = ENDBR64_LENGTH
        index += 1
    start = probe_address + skipped
    if function_end - start < JMP_REL32_LENGTH:
        left = function_end - start
        where = (f"the function is {left} bytes long" if start == function_address
                 else f"only {left} bytes are left from {start:#x} to the function's end")
        return Refusal(RefusalKind.TOO_SHORT, f"{where}, fewer than the {JMP_REL32_LENGTH} "
                       "of a jmp")
    end = start
    while end < start + JMP_REL32_LENGTH:
        index += 1
        end = boundaries[index] if index < len(boundaries) else function_end

    offset = start - function_address
    instructions = tuple(decode_function(code[offset:end - function_address], start))
    for insn in instructions:
        refusal = _displaceable(insn)
        if refusal is not None:
            return refusal
    for insn in instructions[:-1]:
        if insn.instruction.flow_control in _NO_FALL_THROUGH:
            return Refusal(RefusalKind.CONTROL_FLOW, f"'{insn.text}' at {insn.address:#x} is "
                           f"within the {JMP_REL32_LENGTH} bytes a jmp needs and does not fall "
                           "through: the bytes after it are reached only by what no sweep sees "
                           "(a landing pad, a jump-table entry) or not at all")
    refusal = _reached_inside(scan, start, end, code, function_address, read_data)
    if refusal is not None:
        return refusal
    return Region(start, end, instructions, skipped)


def _boundary_index(boundaries: list[int], address: int) -> int:
    index = bisect_left(boundaries, address)
    if index < len(boundaries) and boundaries[index] == address:
        return index
    before = boundaries[index - 1]
    after = boundaries[index] if index < len(boundaries) else address + 1
    raise MidInstructionError(address, before, after)


# What may run from a trampoline although it is not FlowControl.NEXT: direct jumps (a target
# is absolute once decoded; relocation re-encodes it, a short form widened to rel32) and a near
# ret (it leaves for the caller, as it would have from the original bytes). Not loop/jrcxz
# (short-only: iced would add stubs), xbegin, far or 16-bit forms.
_RETURNS = frozenset({Code.RETNQ, Code.RETNQ_IMM16})
_DIRECT_CALL = Code.CALL_REL32_64  # relocate_in_trampoline turns it into push + jmp
_NO_FALL_THROUGH = frozenset({FlowControl.RETURN, FlowControl.UNCONDITIONAL_BRANCH})


def _relocatable_flow(instruction: Instruction) -> bool:
    if instruction.code in _RETURNS or instruction.code == _DIRECT_CALL:
        return True
    return ((instruction.is_jcc_short_or_near or instruction.is_jmp_short_or_near)
            and instruction.op0_kind == OpKind.NEAR_BRANCH64)


def _displaceable(insn: Insn) -> Refusal | None:
    """None when INSN runs unchanged (or re-targeted) from a trampoline, else why not."""
    instruction = insn.instruction
    flow = instruction.flow_control
    if flow != FlowControl.NEXT:
        if _relocatable_flow(instruction):
            return None
        if instruction.is_call_near_indirect:
            why = "an indirect call is not relocated (only a direct call rel32 is)"
        elif flow == FlowControl.INDIRECT_BRANCH:
            why = "an indirect jump leaves to where no rule can check"
        elif flow in (FlowControl.CONDITIONAL_BRANCH, FlowControl.XBEGIN_XABORT_XEND):
            why = "a short-only or transactional branch cannot be widened"
        else:  # a syscall, int n, ud2, retf... (iced calls syscall a CALL): classify() says why
            why = classify(insn).reason
        return Refusal(RefusalKind.CONTROL_FLOW, f"'{insn.text}' at {insn.address:#x} is within "
                       f"the {JMP_REL32_LENGTH} bytes a jmp needs: {why}")
    if instruction.code in NOP_CODES:
        return None
    verdict = classify(insn)
    if verdict.kind is not Kind.BOOST:
        return Refusal(RefusalKind.NOT_RELOCATABLE, f"'{insn.text}' at {insn.address:#x} is "
                       f"within the {JMP_REL32_LENGTH} bytes a jmp needs and cannot run from a "
                       f"trampoline ({verdict.kind.value} as a breakpoint): {verdict.reason}")
    return None


def _reached_inside(scan: _Scan, start: int, end: int, code: bytes, address: int,
                    read_data: ReadData | None) -> Refusal | None:
    """Why something in the function could reach [start, end) past its first byte, or None."""
    inside = range(start + 1, end)
    span = f"the patched bytes {start:#x}..{end:#x}"
    for source, target in scan.branches:
        if target in inside:
            return Refusal(RefusalKind.BRANCH_INTO, f"a branch at {source:#x} jumps into {span} "
                           f"(to {target:#x})")
    for endbr in scan.endbrs:
        if endbr in inside:
            return Refusal(RefusalKind.ENDBR_INSIDE, f"the endbr64 at {endbr:#x} marks an "
                           f"indirect-branch target inside {span}")
    for source, target in scan.addresses:
        if target in inside:
            return Refusal(RefusalKind.ADDRESS_INTO, f"the instruction at {source:#x} takes the "
                           f"address {target:#x}, inside {span}")
    if scan.jumps:
        found = scan.boundaries[scan.jumps[0]] if read_data is None else \
            switches(code, address, scan.boundaries, scan.jumps, [t for _, t in scan.branches], read_data)
        if not isinstance(found, list):
            return Refusal(RefusalKind.INDIRECT_JUMP, f"the function has an indirect jump "
                           f"('{_text_of(code, address, found)}' at {found:#x}) that is no "
                           f"recognised switch: a jump table could target {span}")
        for switch in found:
            target = next((t for t in switch.targets if t in inside), None)
            if target is not None:
                return Refusal(RefusalKind.BRANCH_INTO, f"an entry of the switch table at "
                               f"{switch.table:#x} (jmp at {switch.jump:#x}) jumps into {span} "
                               f"(to {target:#x})")
    return None


# --- the trampoline and the patch ---------------------------------------------------------

def _count_action(address: int, counter_address: int) -> bytes:
    """Save the flags (lahf), ``lock inc`` the counter, restore: the count action at ADDRESS."""
    increment = Instruction.create_mem(Code.INC_RM64, MemoryOperand(Register.RIP, displ=counter_address))
    increment.has_lock_prefix = True
    items = [red_zone_step(True), *flags_save(), increment, *flags_restore(), red_zone_step(False)]
    return encode_action(items, address, {items.index(increment): counter_address})


def _assemble(region: Region, address: int, action: bytes, action_pushes: tuple[tuple[int, int], ...] = (),
              counted_offset: int | None = None) -> Trampoline:
    """The trampoline: ACTION (its flags pushes ACTION_PUSHES, its popfq at COUNTED_OFFSET if it
    has one), REGION's instructions relocated, the jmp back."""
    code = action
    relocated = []
    flag_pushes = list(action_pushes)
    for insn in region.instructions:
        here = address + len(code)
        relocated.append((here, insn.address))
        if pushed_flags_fixup(insn):
            flag_pushes.append((here, pushed_flags_fixup(insn)))
        code += relocate_in_trampoline(insn, here)
    return_jump = address + len(code)
    last = region.instructions[-1].instruction
    # After a jmp, a ret or a call (a push and a jmp here) nothing runs on: no jmp back, and
    # return_jump is the trampoline's end, where no thread can be.
    if last.flow_control not in _NO_FALL_THROUGH and not last.is_call_near:
        back = rel32(return_jump + JMP_REL32_LENGTH, region.end)
        if back is None:
            raise RelocationError(f"trampoline {address:#x} is beyond ±2 GiB of {region.end:#x}: "
                                  "the jmp back cannot reach it")
        code += bytes((_JMP_REL32,)) + back.to_bytes(4, "little", signed=True)
    return Trampoline(address, code, len(action), tuple(relocated), return_jump, region.end,
                      tuple(flag_pushes), counted_offset)


def count_trampoline(region: Region, address: int, counter_address: int) -> Trampoline:
    """The ``count`` trampoline for REGION, to be placed at ADDRESS, counting in the 8-byte
    counter at COUNTER_ADDRESS. Raises RelocationError when the counter, a RIP-relative
    operand or region.end is beyond ±2 GiB of the trampoline."""
    return _assemble(region, address, _count_action(address, counter_address))


def jump_patch(region: Region, trampoline_address: int) -> bytes:
    """The bytes to write over REGION: ``jmp rel32`` to the trampoline, then int3 up to
    region.end (see the module docstring for why int3). Raises RelocationError when the
    trampoline is beyond ±2 GiB of the region."""
    rel = rel32(region.start + JMP_REL32_LENGTH, trampoline_address)
    if rel is None:
        raise RelocationError(f"trampoline {trampoline_address:#x} is beyond ±2 GiB of "
                              f"{region.start:#x}: map it near the module")
    padding = region.length - JMP_REL32_LENGTH
    return bytes((_JMP_REL32,)) + rel.to_bytes(4, "little", signed=True) + bytes((_INT3,)) * padding


def stack_words(stack: bytes) -> list[int]:
    """The words of STACK (read from a stack pointer up), sorted: a return address or a signal
    frame's saved RIP among them must not point past a region's first byte."""
    return sorted(set(memoryview(stack)[:len(stack) - len(stack) % _STACK_WORD].cast("Q")))
