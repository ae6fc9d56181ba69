"""The rescue handler's machine code and data layout: what keeps a program alive when its tracer dies.

While pyprobes lives, ptrace shows it every SIGTRAP first and none of its own ever reaches the
program (invariant 8), so this handler never runs. If pyprobes is killed (SIGKILL, OOM), every
int3 it wrote is still in the text, and a thread that was stopped at one, or hits one later, gets
a SIGTRAP with no tracer to take it. The engine (engine/rescue.py) installs this handler for
SIGTRAP in a program that has none of its own; it runs `handler(sig, siginfo, ucontext)`:

  si_code TRAP_TRACE (a single step the dead tracer asked for):
      clear TF in the saved flags and return: the thread goes on from where the step left it
      (every slot copy carries its jmp back, so the end of a copy leads back to original code).
  si_code <= 0 (kill, tgkill, sigqueue: a process sent it), or a saved RIP not in the table:
      not a trap of ours: put back the default disposition (the one the program had) and raise
      SIGTRAP again on this thread, so it takes the default action as it would have untraced.
  a saved RIP found in the table (the entry's key):
      if the entry says so, write the original byte back over the int3 just before the key
      (pwrite on /proc/self/mem, which writes read-only text as the tracer did), so this probe
      never traps again; then set the saved RIP to the entry's resume address and return
      through our sa_restorer (rt_sigreturn).

The table (written by the tracer) holds, for each armed probe point at A: A + 1 -> A with the
original byte (a trap on the int3); and every place the tracer may have moved a thread to at a
breakpoint stop without resuming it yet (the slot; an emulation's result) -> itself, since that
stop still carries its SIGTRAP and the kernel delivers it when the tracer dies.

Layout. The code page (PROT_READ|PROT_EXEC) starts with a pointer to the data mapping, then the
restorer and the handler. The data mapping (PROT_READ|PROT_WRITE: the kernel writes the old
sigaction there) holds the entry count, the two sigactions, the path, and the entries.
"""
from __future__ import annotations

import struct

from .decode import Insn
from .relocate import SLOT_SIZE, RelocationError, SlotCode

__all__ = [
    "ASSEMBLY", "CODE", "ENTRY_SIZE", "HANDLER_OFFSET", "RESTORER_OFFSET", "DATA_POINTER_OFFSET",
    "DATA_HEADER_SIZE", "DATA_COUNT_OFFSET", "DATA_ACTION_OFFSET", "DATA_DEFAULT_OFFSET",
    "DATA_OLD_ACTION_OFFSET", "SIGACTION_SIZE", "SIGTRAP", "SIG_DFL", "SA_RESTORER",
    "UCONTEXT_RIP_OFFSET", "UCONTEXT_EFLAGS_OFFSET", "SIGINFO_CODE_OFFSET",
    "code_page", "data_header", "entry", "sigaction", "sigaction_handler", "trap_entries",
    "with_jmp_back",
]

SIGTRAP = 5
SIG_DFL = 0
SA_SIGINFO = 0x4
SA_ONSTACK = 0x08000000
SA_RESTORER = 0x04000000
SIGACTION_SIZE = 32  # the kernel's struct sigaction on x86-64: handler, flags, restorer, mask

# <ucontext.h>: uc_mcontext.gregs sits at 40; REG_RIP is 16 and REG_EFL 17 (8 bytes each).
# <signal.h>: si_code after si_signo and si_errno. tests/x86/test_rescue_code.py checks them with a C compiler.
UCONTEXT_RIP_OFFSET = 168
UCONTEXT_EFLAGS_OFFSET = 176
SIGINFO_CODE_OFFSET = 8

DATA_POINTER_OFFSET = 0x00
RESTORER_OFFSET = 0x10
HANDLER_OFFSET = 0x20

DATA_COUNT_OFFSET = 0x00
DATA_ACTION_OFFSET = 0x10
DATA_DEFAULT_OFFSET = 0x30
DATA_OLD_ACTION_OFFSET = 0x50
DATA_PATH_OFFSET = 0x70
DATA_HEADER_SIZE = 0x80
ENTRY_SIZE = 24  # key, resume, original byte | HEAL (0: nothing to write back)
HEAL = 0x100
PROC_SELF_MEM = b"/proc/self/mem\0"

# GNU as, Intel syntax; CODE is what it assembles to (tests/x86/test_rescue_code.py checks).
ASSEMBLY = """\
.intel_syntax noprefix
data_pointer: .quad 0
.quad 0
restorer:                               # sa_restorer: rt_sigreturn
    mov eax, 15
    syscall
.balign 32, 0xcc
handler:                                # rdi = signal, rsi = siginfo, rdx = ucontext
    mov r14, [rip + data_pointer]
    mov r12, rdx
    mov eax, [rsi + 8]                  # si_code
    cmp eax, 2                          # TRAP_TRACE
    je stepped
    test eax, eax
    jle foreign                         # SI_USER, SI_TKILL, SI_QUEUE...: sent, not trapped
    mov rax, [r12 + 168]                # the saved RIP
    mov rcx, [r14]                      # the entry count
    lea r13, [r14 + 0x80]
search:
    test rcx, rcx
    jz foreign
    cmp [r13], rax
    je found
    add r13, 24
    dec rcx
    jmp search
found:
    cmp qword ptr [r13 + 16], 0
    je resume
    mov eax, 257                        # openat(AT_FDCWD, "/proc/self/mem", O_RDWR | O_CLOEXEC)
    mov edi, -100
    lea rsi, [r14 + 0x70]
    mov edx, 0x80002
    xor r10d, r10d
    syscall
    test rax, rax
    js foreign
    mov r15, rax
    mov edi, r15d                       # pwrite64(fd, &original byte, 1, key - 1)
    lea rsi, [r13 + 16]
    mov edx, 1
    mov r10, [r13]
    dec r10
    mov eax, 18
    syscall
    mov rbx, rax
    mov edi, r15d                       # close(fd)
    mov eax, 3
    syscall
    cmp rbx, 1
    jne foreign                         # cannot heal: resuming would trap again for ever
resume:
    mov rax, [r13 + 8]
    mov [r12 + 168], rax
    ret
stepped:
    and qword ptr [r12 + 176], -257     # TF off in the saved flags
    ret
foreign:
    mov eax, 13                         # rt_sigaction(SIGTRAP, &default, NULL, 8)
    mov edi, 5
    lea rsi, [r14 + 0x30]
    xor edx, edx
    mov r10d, 8
    syscall
    mov eax, 39                         # tgkill(getpid(), gettid(), SIGTRAP): delivered
    syscall                             # once the handler returns and unblocks it
    mov rbx, rax
    mov eax, 186
    syscall
    mov rsi, rax
    mov rdi, rbx
    mov edx, 5
    mov eax, 234
    syscall
    ret
"""

CODE = bytes.fromhex(
    "00000000000000000000000000000000b80f0000000f05cccccccccccccccccc4c8b35d9ffffff4989d48b4608"
    "83f8020f848f00000085c00f8e94000000498b8424a8000000498b0e4d8dae800000004885c9747d4939450074"
    "094983c51848ffc9ebec49837d1000744db801010000bf9cffffff498d7670ba020008004531d20f054885c078"
    "4a4989c74489ff498d7510ba010000004d8b550049ffcab8120000000f054889c34489ffb8030000000f054883"
    "fb01751a498b450849898424a8000000c34981a424b0000000fffeffffc3b80d000000bf05000000498d763031"
    "d241ba080000000f05b8270000000f054889c3b8ba0000000f054889c64889dfba05000000b8ea0000000f05c3")

_JMP_REL32 = 0xE9
_JMP_REL32_LEN = 5


def code_page(data_address: int) -> bytes:
    """The code page's contents, pointing at the data mapping at DATA_ADDRESS."""
    return struct.pack("<Q", data_address) + CODE[8:]


def sigaction(handler: int, flags: int = 0, restorer: int = 0, mask: int = 0) -> bytes:
    return struct.pack("<QQQQ", handler, flags, restorer, mask)


def sigaction_handler(raw: bytes) -> int:
    """The handler field (SIG_DFL 0, SIG_IGN 1, else an address) of a kernel struct sigaction."""
    return struct.unpack_from("<Q", raw)[0]


def data_header(code_address: int) -> bytes:
    """The data mapping's header for the code page at CODE_ADDRESS (no entries yet)."""
    ours = sigaction(code_address + HANDLER_OFFSET, SA_SIGINFO | SA_ONSTACK | SA_RESTORER,
                     code_address + RESTORER_OFFSET)
    header = bytearray(DATA_HEADER_SIZE)
    header[DATA_ACTION_OFFSET:DATA_ACTION_OFFSET + SIGACTION_SIZE] = ours
    header[DATA_DEFAULT_OFFSET:DATA_DEFAULT_OFFSET + SIGACTION_SIZE] = sigaction(SIG_DFL)
    header[DATA_PATH_OFFSET:DATA_PATH_OFFSET + len(PROC_SELF_MEM)] = PROC_SELF_MEM
    return bytes(header)


def entry(key: int, resume: int, original: int | None = None) -> bytes:
    """A table entry: a trap with the saved RIP = KEY resumes at RESUME, after writing ORIGINAL
    (a byte) back at KEY - 1 if given."""
    return struct.pack("<QQQ", key, resume, 0 if original is None else HEAL | original)


def trap_entries(insn: Insn, slot_address: int | None, emulated: bool) -> list[tuple[int, int, int | None]]:
    """(key, resume, original byte or None) for a probe point on INSN: its int3 heals and reruns
    the instruction in place; a thread the tracer had moved to the slot or to an emulation's
    result, and not yet resumed, goes on from there."""
    address = insn.address
    found = [(address + 1, address, insn.raw[0])]
    if slot_address is not None:
        found.append((slot_address, slot_address, None))
    if emulated:
        results = {address + insn.length}
        instruction = insn.instruction
        if instruction.near_branch_target:
            results.add(instruction.near_branch_target)
        found.extend((r, r, None) for r in sorted(results) if r != address + 1)
    return found


def with_jmp_back(insn: Insn, slot_address: int, code: SlotCode) -> SlotCode:
    """CODE with a jmp back to the instruction after INSN behind the copy, if it has none.

    A stepped copy never runs it while pyprobes lives (the step stops before it), but a copy
    whose step the tracer's death cut short, or a call stepped from the slot that returns there
    afterwards, does: it leads back to original code (the rescue, module docstring)."""
    if len(code.code) != code.copy_length:
        return code
    end = slot_address + code.copy_length + _JMP_REL32_LEN
    back = code.resume_address - end
    if not -(1 << 31) <= back < (1 << 31) or code.copy_length + _JMP_REL32_LEN > SLOT_SIZE:
        raise RelocationError(f"no room or reach for the jmp back after '{insn.text}' in slot {slot_address:#x}")
    tail = bytes((_JMP_REL32,)) + back.to_bytes(4, "little", signed=True)
    return SlotCode(code.code + tail, code.copy_length, code.resume_address, code.exits)
