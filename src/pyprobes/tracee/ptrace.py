"""Our own small ctypes binding of ptrace(2), process_vm_readv(2), tgkill(2), rt_tgsigqueueinfo(2)
and the x86-64 register file.

python-ptrace lacks PTRACE_SEIZE/INTERRUPT/LISTEN and thread support, so pyprobes carries
exactly what it needs here and nothing more. Every function raises OSError with errno set,
so callers can tell ESRCH (thread gone) from EPERM or EIO.
"""
from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

_ptrace = _libc.ptrace
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_ptrace.restype = ctypes.c_long

# The calls on every probe hit (PEEKUSER/POKEUSER of a register, CONT, SINGLESTEP) go through a
# second handle on ptrace, measured 0.3-0.5 µs cheaper per call than the one above: a PyDLL
# keeps the GIL (these requests never block) and, without argtypes, each argument is passed as
# it is instead of being converted. Python ints then go as C int, which is what the request,
# the tid, a register offset and a signal number are; a 64-bit value goes in a c_ulong (a plain
# int of 2**31 or more would be cut to 32 bits without a word said).
_ptrace_hot = ctypes.PyDLL(None, use_errno=True).ptrace
_ptrace_hot.restype = ctypes.c_long
# The one c_ulong those 64-bit values go in (one tracer thread drives ptrace): no object per hit.
_word = ctypes.c_ulong()

# Requests (linux/ptrace.h).
PTRACE_PEEKUSER = 3
PTRACE_POKEUSER = 6
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETFPREGS = 14
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_SECCOMP_GET_FILTER = 0x420C

# Options and the events they report in (status >> 16).
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEVFORKDONE = 0x20
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_VFORK_DONE = 5
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_STOP = 128

WALL = 0x40000000  # __WALL: wait for every thread, cloned or not
WNOTHREAD = 0x20000000  # __WNOTHREAD: only the calling thread's children and tracees
WNOHANG = os.WNOHANG

SI_KERNEL = 0x80
SI_USER = 0
TRAP_BRKPT = 1
TRAP_TRACE = 2

TRACE_OPTIONS = (PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK
                 | PTRACE_O_TRACEEXEC | PTRACE_O_TRACEEXIT)

REGISTER_NAMES = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
    "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)


class Regs(ctypes.Structure):
    """struct user_regs_struct (x86-64), as PTRACE_GETREGS fills it."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in REGISTER_NAMES]

    def copy(self) -> "Regs":
        clone = Regs()
        ctypes.pointer(clone)[0] = self
        return clone

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in REGISTER_NAMES}

    def __repr__(self) -> str:
        return "Regs(" + ", ".join(f"{n}={getattr(self, n):#x}" for n in REGISTER_NAMES[:19]) + ")"


# Byte offsets into struct user (the regs come first), for PEEKUSER/POKEUSER.
REG_OFFSET = {name: 8 * i for i, name in enumerate(REGISTER_NAMES)}
RIP_OFFSET = REG_OFFSET["rip"]


class SigInfo(ctypes.Structure):
    """siginfo_t: the fields pyprobes reads, plus the raw 128 bytes to hand back unchanged."""

    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad0", ctypes.c_int),
        ("si_addr", ctypes.c_ulonglong),  # also si_pid / si_uid for kill()
        ("_rest", ctypes.c_byte * 104),
    ]

    @property
    def si_pid(self) -> int:
        return self.si_addr & 0xFFFFFFFF


def _call(request: int, tid: int, addr: int | None, data: object) -> int:
    result = _ptrace(request, tid, addr, data)
    if result == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
    return result


def seize(tid: int, options: int = TRACE_OPTIONS) -> None:
    _call(PTRACE_SEIZE, tid, None, options)


def interrupt(tid: int) -> None:
    _call(PTRACE_INTERRUPT, tid, None, None)


def listen(tid: int) -> None:
    _call(PTRACE_LISTEN, tid, None, None)


def _fail(request: int, tid: int) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")


def cont(tid: int, signal: int = 0) -> None:
    if _ptrace_hot(PTRACE_CONT, tid, None, signal) == -1:
        _fail(PTRACE_CONT, tid)


def singlestep(tid: int, signal: int = 0) -> None:
    if _ptrace_hot(PTRACE_SINGLESTEP, tid, None, signal) == -1:
        _fail(PTRACE_SINGLESTEP, tid)


def detach(tid: int, signal: int = 0) -> None:
    _call(PTRACE_DETACH, tid, None, signal)


def seccomp_get_filter(tid: int, index: int) -> bytes:
    """The classic-BPF program (struct sock_filter[]) of stopped thread TID's seccomp filter
    INDEX, 0 being the one installed last. ENOENT past the oldest; EACCES without CAP_SYS_ADMIN."""
    length = _call(PTRACE_SECCOMP_GET_FILTER, tid, index, None)
    buf = ctypes.create_string_buffer(8 * length)
    length = _call(PTRACE_SECCOMP_GET_FILTER, tid, index, buf)
    return buf.raw[:8 * length]


def getregs(tid: int, regs: Regs | None = None) -> Regs:
    if regs is None:
        regs = Regs()
    _call(PTRACE_GETREGS, tid, None, ctypes.byref(regs))
    return regs


def setregs(tid: int, regs: Regs) -> None:
    _call(PTRACE_SETREGS, tid, None, ctypes.byref(regs))


XMM0_OFFSET = 160  # in struct user_fpregs_struct (the FXSAVE image): xmm_space follows st_space


def get_xmm0(tid: int) -> bytes:
    """The 16 bytes of xmm0 (where the SysV ABI returns a float or double)."""
    return get_xmm(tid, 0)


def get_xmm(tid: int, n: int) -> bytes:
    """The 16 bytes of xmmN, 0 <= N < 16 (the SysV ABI passes floating arguments in xmm0..7)."""
    if not 0 <= n < 16:
        raise ValueError(f"no register xmm{n}")
    image = ctypes.create_string_buffer(512)
    _call(PTRACE_GETFPREGS, tid, None, image)
    start = XMM0_OFFSET + 16 * n
    return image.raw[start:start + 16]


def peekuser(tid: int, offset: int) -> int:
    # PEEKUSER returns the word itself, so -1 is ambiguous: clear errno first.
    ctypes.set_errno(0)
    value = _ptrace_hot(PTRACE_PEEKUSER, tid, offset, None)
    if value == -1 and ctypes.get_errno():
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace(PEEKUSER, {tid}): {os.strerror(err)}")
    return value & 0xFFFFFFFFFFFFFFFF


def pokeuser(tid: int, offset: int, value: int) -> None:
    _word.value = value & 0xFFFFFFFFFFFFFFFF
    if _ptrace_hot(PTRACE_POKEUSER, tid, offset, _word) == -1:
        _fail(PTRACE_POKEUSER, tid)


def get_rip(tid: int) -> int:
    # No errno dance as in peekuser: a user-space RIP is never all ones, so -1 is always an error.
    value = _ptrace_hot(PTRACE_PEEKUSER, tid, RIP_OFFSET, None)
    if value == -1:
        _fail(PTRACE_PEEKUSER, tid)
    return value & 0xFFFFFFFFFFFFFFFF


def set_rip(tid: int, rip: int) -> None:
    _word.value = rip
    if _ptrace_hot(PTRACE_POKEUSER, tid, RIP_OFFSET, _word) == -1:
        _fail(PTRACE_POKEUSER, tid)


class LiveRegs:
    """One thread's registers, each read or written on access (PEEKUSER / POKEUSER).

    For an instruction that touches one or two registers (a jmp, a jcc, a nop) this is one or
    two system calls where GETREGS + SETREGS would be two plus a 216-byte copy each way.
    """

    __slots__ = ("tid",)

    def __init__(self, tid: int = 0) -> None:
        object.__setattr__(self, "tid", tid)

    def __getattr__(self, name: str) -> int:
        return peekuser(self.tid, REG_OFFSET[name])

    def __setattr__(self, name: str, value: int) -> None:
        if name == "tid":
            object.__setattr__(self, name, value)
        else:
            pokeuser(self.tid, REG_OFFSET[name], value)


def geteventmsg(tid: int) -> int:
    value = ctypes.c_ulong()
    _call(PTRACE_GETEVENTMSG, tid, None, ctypes.byref(value))
    return value.value


def getsiginfo(tid: int) -> SigInfo:
    info = SigInfo()
    _call(PTRACE_GETSIGINFO, tid, None, ctypes.byref(info))
    return info


def setsiginfo(tid: int, info: SigInfo) -> None:
    _call(PTRACE_SETSIGINFO, tid, None, ctypes.byref(info))


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                              ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
_process_vm_readv.restype = ctypes.c_ssize_t


# Reads of a few bytes (a return address to check after a stepped call, say) happen on probe hits: they
# reuse one buffer and one pair of iovecs. The tracer drives ptrace from one thread only.
_SMALL = 64
_small_buf = ctypes.create_string_buffer(_SMALL)
_small_local = _IoVec(ctypes.addressof(_small_buf), 0)
_remote = _IoVec(0, 0)


def process_vm_readv(pid: int, address: int, size: int) -> bytes:
    """Read SIZE bytes at ADDRESS of PID in one system call; OSError if any part is unreadable."""
    if size <= _SMALL:
        buf, local = _small_buf, _small_local
        local.iov_len = size
    else:
        buf = ctypes.create_string_buffer(size)
        local = _IoVec(ctypes.addressof(buf), size)
    _remote.iov_base = address
    _remote.iov_len = size
    n = _process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(_remote), 1, 0)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_readv({pid}, {address:#x}, {size}): {os.strerror(err)}")
    if n != size:
        raise OSError(14, f"process_vm_readv({pid}, {address:#x}, {size}): short read of {n} bytes")
    return buf.raw[:size]


def process_vm_readv_upto(pid: int, address: int, size: int) -> bytes:
    """Up to SIZE bytes at ADDRESS of PID in one system call: the kernel stops at the first
    unmapped page, so this is what is readable there (b"" if nothing); OSError otherwise."""
    buf = ctypes.create_string_buffer(size)
    local = _IoVec(ctypes.addressof(buf), size)
    remote = _IoVec(address, size)
    n = _process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        err = ctypes.get_errno()
        if err == 14:  # EFAULT: not even the first page is there
            return b""
        raise OSError(err, f"process_vm_readv({pid}, {address:#x}, {size}): {os.strerror(err)}")
    return buf.raw[:n]


# System call numbers (x86-64, asm/unistd_64.h) of the two calls libc has no wrapper for.
SYS_TGKILL = 234
SYS_RT_TGSIGQUEUEINFO = 297
_syscall = _libc.syscall


def tgkill(tgid: int, tid: int, sig: int) -> None:
    """Send SIG to thread TID of thread group TGID."""
    if _syscall(SYS_TGKILL, tgid, tid, sig) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"tgkill({tgid}, {tid}, {sig}): {os.strerror(err)}")


def rt_tgsigqueueinfo(tgid: int, tid: int, sig: int, info: SigInfo) -> bool:
    """Queue SIG with INFO for thread TID; False if the kernel refused (it refuses kernel-made
    siginfo, si_code >= 0, sent from another process)."""
    return _syscall(SYS_RT_TGSIGQUEUEINFO, tgid, tid, sig, ctypes.byref(info)) == 0
