"""Return probes inside the process (issue 12): the shadow-stack area, its entry routine and the return trampoline.

The stop-based return probe (engine/retprobe.py) keeps each thread's shadow stack in the tracer
and stops the thread twice per call. Here the same shadow stack lives in tracee memory, and
both halves run in the tracee with no stop:

* **Entry**: the probe's jump-optimised trampoline (optimize.py/record.py, the "call a routine"
  shape) calls the shared *entry routine* with the shadow probe id in r11, the flags and r11
  saved by the trampoline, and the function's return-address slot at ``rsp + ROUTINE_FRAME``
  (record.py) as the routine starts. The routine finds the thread's shadow stack (keyed by
  ``%fs:0``, the TCB's pointer to itself), drops dead frames, pushes a frame (real return
  address, slot, probe id, rdi..r9, the TSC, read last) and writes the *return trampoline*'s
  address into the slot. Depth exhausted or thread table full: the probe's ``missed`` grows,
  the call is not followed.
* **Return**: the function's ``ret`` lands on the return trampoline with rsp = slot + 8. It takes
  the slot back (``sub rsp, 8``) and saves what it uses, flags included, reads the TSC first,
  drops dead frames, pops the frame, adds the latency to the probe's statistics and histogram,
  optionally writes a return record to the ring, writes the real return address into the slot
  and ``ret``\\ s through it: rsp, rax, rdx, xmm0 and the flags as the function left them.

Frame liveness, the rule the stop-based probes use (uprobes' arch_uretprobe_is_alive): the stack
grows down, so a frame whose slot lies below the current stack pointer was abandoned (longjmp,
an exception); it is dropped and counted in its probe's ``dropped``. At entry, with SLOT the new
call's return-address slot: frames with ``slot < SLOT`` are dead, and a frame with ``slot ==
SLOT`` is dead too unless ``[SLOT]`` already holds the return trampoline (a tail call from a
hijacked frame: the new frame is *chained* on the same slot and both return together, innermost
first: the return trampoline ``ret``\\ s to the trampoline again). At return (slot = rsp - 8 after
``sub``): frames with ``slot < SLOT`` are dead; the top frame then has ``slot == SLOT``.

Threads claim their table entry themselves: linear probing from ``hash(key)`` over the table;
an empty entry (key 0) is claimed with ``lock cmpxchg``. Only the owning thread touches its
entry afterwards (the tracer too, but only with every thread frozen and out of the code page).
The tracer resets an entry's depth when its thread exits (a new thread may reuse the TCB).

The area (one memfd, rw-, mapped by the tracee and the tracer; all words little-endian u64)::

    header            one page at offset 0 (HEADER_* offsets below)
    thread table      ShadowLayout.threads entries of ShadowLayout.thread_size bytes:
                        +0 key (%fs:0; 0: free)   +8 depth (live frames)   +16 frames[depth]
                      a frame: FRAME (ret, slot, tsc, probe id, rdi rsi rdx rcx r8 r9)
    probe pages       ShadowLayout.probes pages, page i for shadow probe id i: STATS, then
                      BUCKETS latency buckets (u64 each) at PROBE_BUCKETS_OFFSET

Latency histogram: nanoseconds (TSC ticks times header's ns-per-tick, a 32.32 fixed-point
number, minus the header's measured overhead in ticks, clamped at 0) in log2 buckets split
8 ways: latency_bucket() is the reference the code must agree with.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "BUCKETS",
    "FRAME",
    "FRAME_SIZE",
    "HEADER",
    "PROBE_BUCKETS_OFFSET",
    "RECORD_ENTRY",
    "RECORD_RETURN",
    "RETURN_RECORD_FLAG",
    "SHADOW_MAGIC",
    "SHADOW_VERSION",
    "STATS",
    "ShadowLayout",
    "bucket_bounds",
    "latency_bucket",
    "shadow_entry_routine",
    "return_trampoline",
]

SHADOW_MAGIC = 0x5744_4148_5342_5950  # "PYPBSHDW", little-endian
SHADOW_VERSION = 1
PAGE = 4096

# Header: magic, version, threads, depth, frame size, the return trampoline's address,
# ns per TSC tick as 32.32 fixed point, the measured overhead in ticks (subtracted from every
# latency), the ring's record routine (0: no ring), the probe-page count.
HEADER = struct.Struct("<QQQQQQQQQQ")
HEADER_TRAMPOLINE = 40
HEADER_NS_PER_TICK = 48
HEADER_OVERHEAD = 56
HEADER_RECORD_ROUTINE = 64

# A frame: real return address, its stack slot, entry TSC, shadow probe id, rdi rsi rdx rcx r8 r9.
FRAME = struct.Struct("<QQQQ6Q")
FRAME_SIZE = FRAME.size  # 80
THREAD_HEADER = 16       # key, depth

# A probe page's statistics: returns, missed (depth or table exhausted), dropped (abandoned
# frames), sum of latencies (ns), max latency (ns), flags, the ring probe id of its entry
# records, of its return records.
STATS = struct.Struct("<QQQQQQQQ")
RECORD_ENTRY = 1   # flags: the entry routine appends an entry record (id: STATS field 6)
RECORD_RETURN = 2  # flags: the return trampoline appends a return record (id: STATS field 7)
PROBE_BUCKETS_OFFSET = 64
BUCKETS = 496      # latency_bucket() of 2**64 - 1 is 495
# A return record in the ring (record.py's RECORD): TSC of the return, thread key, the probe id
# with this bit set, and args = (rax, entry TSC, entry rdi, rsi, rdx, rcx).
RETURN_RECORD_FLAG = 1 << 31


@dataclass(frozen=True)
class ShadowLayout:
    """The area's geometry: THREADS table entries, DEPTH frames each, PROBES probe pages."""

    threads: int = 128
    depth: int = 64
    probes: int = 64

    def __post_init__(self) -> None:
        if self.threads < 1 or self.threads & (self.threads - 1):
            raise ValueError(f"{self.threads} threads: a power of two is needed (the hash masks)")
        if self.depth < 1 or self.probes < 1:
            raise ValueError("depth and probes must be at least 1")

    @property
    def thread_size(self) -> int:
        return -(-(THREAD_HEADER + self.depth * FRAME_SIZE) // 64) * 64

    @property
    def table_offset(self) -> int:
        return PAGE

    def thread_offset(self, index: int) -> int:
        return self.table_offset + index * self.thread_size

    @property
    def probes_offset(self) -> int:
        return -(-(self.thread_offset(self.threads)) // PAGE) * PAGE

    def probe_offset(self, probe_id: int) -> int:
        if not 0 <= probe_id < self.probes:
            raise ValueError(f"shadow probe id {probe_id} out of 0..{self.probes - 1}")
        return self.probes_offset + probe_id * PAGE

    @property
    def size(self) -> int:
        return self.probes_offset + self.probes * PAGE


def latency_bucket(ns: int) -> int:
    """The histogram bucket of a latency of NS nanoseconds: 0..7 hold 0..7 exactly; above, each
    power of two [2**b, 2**(b+1)) (b >= 3) is split into 8 equal buckets, 8*(b-2) + the three
    bits after the leading one. A bucket is at most 1/8 of its values wide."""
    if ns < 8:
        return max(ns, 0)
    b = ns.bit_length() - 1
    return 8 * (b - 2) + ((ns >> (b - 3)) & 7)


def bucket_bounds(index: int) -> tuple[int, int]:
    """[low, high) of bucket INDEX (the inverse of latency_bucket)."""
    if index < 8:
        return index, index + 1
    b, sub = index // 8 + 2, index % 8
    return (8 + sub) << (b - 3), (9 + sub) << (b - 3)


def shadow_entry_routine(address: int, area: int, layout: ShadowLayout) -> bytes:
    """The entry routine placed at ADDRESS, for the area at AREA with LAYOUT (see the module
    docstring for its contract)."""
    raise NotImplementedError("issue 12: to be written")


def return_trampoline(address: int, area: int, layout: ShadowLayout) -> bytes:
    """The return trampoline placed at ADDRESS, for the area at AREA with LAYOUT."""
    raise NotImplementedError("issue 12: to be written")
