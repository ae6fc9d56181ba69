"""Return probes inside the process (issue 12): the shadow-stack area, its entry routine and the return trampoline.

The stop-based return probe (engine/retprobe.py) keeps each thread's shadow stack in the tracer
and stops the thread twice per call. Here the same shadow stack lives in tracee memory, and
both halves run in the tracee with no stop:

* **Entry**: the probe's jump-optimised trampoline (optimize.py/record.py, the "call a routine"
  shape) calls the shared *entry routine* with the shadow probe id in r11, the flags and r11
  saved by the trampoline (which restores r11 after the call: a followed call leaves the
  routine by ``pop r11; jmp r11``), and the function's return-address slot at ``rsp +
  ROUTINE_FRAME`` (record.py) as the routine starts. The routine finds the thread's shadow stack (keyed by
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
The tracer resets an entry's depth when its thread exits (a new thread may reuse the TCB), but
never clears a key while the area is in use: a search stops at the first free entry, so a freed
entry would hide the keys placed past it (find_thread() is the same search in Python).

The code of both halves: shadow_code.py (importable from here).

The area (one memfd, rw-, mapped by the tracee and the tracer; all words little-endian u64)::

    header            one page at offset 0 (HEADER_* offsets below)
    thread table      ShadowLayout.threads entries of ShadowLayout.thread_size bytes:
                        +0 key (%fs:0; 0: free)   +8 depth (live frames)   +16 frames[depth]
                        +ShadowLayout.sums_offset: the latency sums (ns), one u64 per probe
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
from typing import NamedTuple, Union

Buffer = Union[bytes, bytearray, memoryview]

__all__ = [
    "BUCKETS",
    "SHADOW_CODE_BOUND",
    "FRAME",
    "FRAME_SIZE",
    "Frame",
    "HEADER",
    "PROBE_BUCKETS_OFFSET",
    "PROBE_ENTRY_ID_OFFSET",
    "PROBE_FLAGS_OFFSET",
    "RECORD_ENTRY",
    "RECORD_RETURN",
    "RETURN_RECORD_FLAG",
    "SHADOW_MAGIC",
    "SHADOW_VERSION",
    "STATS",
    "THREAD_DEPTH",
    "THREAD_HASH_MULTIPLIER",
    "ProbeStats",
    "ShadowLayout",
    "bucket_bounds",
    "claimed_entries",
    "entry_frames",
    "find_thread",
    "latency_bucket",
    "latency_ns",
    "ns_per_tick_fixed",
    "probe_buckets",
    "probe_page",
    "probe_stats",
    "probe_sum",
    "probe_sums",
    "shadow_header",
    "thread_frames",
    "thread_hash",
    "shadow_entry_routine",
    "return_trampoline",
]

SHADOW_MAGIC = 0x5744_4148_5342_5950  # "PYPBSHDW", little-endian
SHADOW_VERSION = 2  # 2: latency sums per thread entry, no returns count
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
THREAD_DEPTH = 8         # the depth's offset in a table entry

# A probe page's statistics: a reserved word (version 1's returns count: the code writes
# nothing there, every return is counted once in its bucket, so returns = the buckets' sum),
# missed (depth or table exhausted), dropped (abandoned frames), a reserved word (version 1's
# sum of latencies: each thread entry sums its own, unlocked, and probe_sum() adds them up),
# max latency (ns), flags, the ring probe id of its entry records, of its return records.
STATS = struct.Struct("<QQQQQQQQ")
PROBE_FLAGS_OFFSET, PROBE_ENTRY_ID_OFFSET = 40, 48  # STATS fields 5 and 6: the tracer's to change
RECORD_ENTRY = 1   # flags: the entry routine appends an entry record (id: STATS field 6)
RECORD_RETURN = 2  # flags: the return trampoline appends a return record (id: STATS field 7)
PROBE_BUCKETS_OFFSET = 64
BUCKETS = 496      # latency_bucket() of 2**64 - 1 is 495
_BUCKETS = struct.Struct(f"<{BUCKETS}Q")
# A return record in the ring (record.py's RECORD): TSC of the return, thread key, the probe id
# with this bit set, and args = (rax, entry TSC, entry rdi, rsi, rdx, rcx).
RETURN_RECORD_FLAG = 1 << 31
# The thread table's hash: Knuth's multiplicative constant, 2**64 / golden ratio.
THREAD_HASH_MULTIPLIER = 0x9E37_79B9_7F4A_7C15
_U64 = (1 << 64) - 1


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
        return -(-(self.sums_offset + 8 * self.probes) // 64) * 64

    @property
    def sums_offset(self) -> int:
        """Where a thread entry's latency sums (one u64 per probe id) start in it."""
        return THREAD_HEADER + self.depth * FRAME_SIZE

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


def thread_hash(key: int, threads: int) -> int:
    """The table entry where the search for KEY starts: the top log2(THREADS) bits of
    key * THREAD_HASH_MULTIPLIER (mod 2**64), as the routines compute it."""
    bits = threads.bit_length() - 1
    return ((key * THREAD_HASH_MULTIPLIER) & _U64) >> (64 - bits) if bits else 0


def find_thread(view: Buffer, layout: ShadowLayout, key: int) -> int | None:
    """The index of KEY's table entry in the area VIEW (bytes-like, from offset 0), following
    the routines' probing, or None (the thread never ran a probed call)."""
    index = thread_hash(key, layout.threads)
    for _ in range(layout.threads):
        found = _word(view, layout.thread_offset(index))
        if found == key:
            return index
        if found == 0:
            return None
        index = (index + 1) & (layout.threads - 1)
    return None


class Frame(NamedTuple):
    """A live call on a thread's shadow stack."""

    ret: int        # the real return address
    slot: int       # the stack slot holding the return trampoline's address meanwhile
    tsc: int        # the TSC at entry
    probe_id: int   # the shadow probe id (its probe page)
    args: tuple[int, ...]  # rdi rsi rdx rcx r8 r9 at entry


def entry_frames(view: Buffer, layout: ShadowLayout, index: int) -> list[Frame]:
    """Table entry INDEX's live frames, outermost first. A depth beyond the layout's (a torn
    read) is clamped."""
    at = layout.thread_offset(index)
    stack = []
    for i in range(min(_word(view, at + THREAD_DEPTH), layout.depth)):
        ret, slot, tsc, probe_id, *args = FRAME.unpack_from(view, at + THREAD_HEADER + i * FRAME_SIZE)
        stack.append(Frame(ret, slot, tsc, probe_id, tuple(args)))
    return stack


def claimed_entries(view: Buffer, layout: ShadowLayout) -> dict[int, int]:
    """Thread key (%fs:0) -> its table entry's index, for every claimed entry."""
    found = {}
    for index in range(layout.threads):
        key = _word(view, layout.thread_offset(index))
        if key:
            found[key] = index
    return found


def thread_frames(view: Buffer, layout: ShadowLayout) -> dict[int, list[Frame]]:
    """Every claimed table entry's live frames, outermost first, by thread key (%fs:0)."""
    return {key: entry_frames(view, layout, index) for key, index in claimed_entries(view, layout).items()}


class ProbeStats(NamedTuple):
    """A probe page's statistics (latencies in ns, the overhead already subtracted)."""

    returns: int    # the buckets' sum
    missed: int
    dropped: int
    sum_ns: int
    max_ns: int
    flags: int
    entry_record_id: int
    return_record_id: int
    buckets: tuple[int, ...]  # BUCKETS counts, bucket_bounds(i) for their ranges


def probe_stats(view: Buffer, layout: ShadowLayout, probe_id: int,
                sums: list[int] | None = None) -> ProbeStats:
    """The statistics of shadow probe PROBE_ID in the area VIEW (returns: the buckets' sum;
    sum_ns: probe_sum(), or SUMS[PROBE_ID] given probe_sums() for many probes)."""
    buckets = probe_buckets(view, layout, probe_id)
    _, missed, dropped, _, *rest = STATS.unpack_from(view, layout.probe_offset(probe_id))
    total = probe_sum(view, layout, probe_id) if sums is None else sums[probe_id]
    return ProbeStats(sum(buckets), missed, dropped, total, *rest, buckets)


def probe_buckets(view: Buffer, layout: ShadowLayout, probe_id: int) -> tuple[int, ...]:
    """The latency bucket counts of shadow probe PROBE_ID (bucket_bounds(i) for their ranges)."""
    return _BUCKETS.unpack_from(view, layout.probe_offset(probe_id) + PROBE_BUCKETS_OFFSET)


def probe_sum(view: Buffer, layout: ShadowLayout, probe_id: int) -> int:
    """The latencies (ns) of shadow probe PROBE_ID summed over every claimed thread entry
    (an entry keeps its sums when its thread exits: they only grow), mod 2**64."""
    layout.probe_offset(probe_id)  # the range check
    return probe_sums(view, layout)[probe_id]


def probe_sums(view: Buffer, layout: ShadowLayout) -> list[int]:
    """probe_sum() of every shadow probe id, in one pass over the thread table."""
    sums = struct.Struct(f"<{layout.probes}Q")
    totals = [0] * layout.probes
    for index in range(layout.threads):
        at = layout.thread_offset(index)
        if _word(view, at):
            totals = [a + b for a, b in zip(totals, sums.unpack_from(view, at + layout.sums_offset))]
    return [t & _U64 for t in totals]


def probe_page(flags: int = 0, entry_record_id: int = 0, return_record_id: int = 0) -> bytes:
    """A fresh probe page's statistics: zero counts, FLAGS and the ring probe ids of its records
    (below RETURN_RECORD_FLAG)."""
    if not 0 <= entry_record_id < RETURN_RECORD_FLAG or not 0 <= return_record_id < RETURN_RECORD_FLAG:
        raise ValueError("a ring probe id of a shadow probe must be below 2**31")
    return STATS.pack(0, 0, 0, 0, 0, flags, entry_record_id, return_record_id)


def shadow_header(layout: ShadowLayout, trampoline: int, ns_per_tick_fixed: int,
                  overhead_ticks: int, record_routine: int = 0) -> bytes:
    """The area's header: TRAMPOLINE the return trampoline's address, NS_PER_TICK_FIXED the ns
    per TSC tick as 32.32 fixed point (ns_per_tick_fixed() of a float), OVERHEAD_TICKS subtracted
    from every latency, RECORD_ROUTINE the ring's record routine (0: no ring)."""
    return HEADER.pack(SHADOW_MAGIC, SHADOW_VERSION, layout.threads, layout.depth, FRAME_SIZE,
                       trampoline, ns_per_tick_fixed, overhead_ticks, record_routine, layout.probes)


def ns_per_tick_fixed(ns_per_tick: float) -> int:
    """NS_PER_TICK as the header's 32.32 fixed-point number."""
    return round(ns_per_tick * (1 << 32))


def latency_ns(ticks: int, overhead_ticks: int, ns_per_tick_fixed: int) -> int:
    """What the return trampoline computes from a call's TICKS (return TSC - entry TSC, mod 2**64)."""
    signed = ((ticks - overhead_ticks + (1 << 63)) & _U64) - (1 << 63)
    return ((max(signed, 0) * ns_per_tick_fixed) >> 32) & _U64


def _word(view: Buffer, offset: int) -> int:
    return int.from_bytes(view[offset:offset + 8], "little")


# The generators need the constants above (a cycle only at import time of this module).
from .shadow_code import SHADOW_CODE_BOUND, return_trampoline, shadow_entry_routine  # noqa: E402
