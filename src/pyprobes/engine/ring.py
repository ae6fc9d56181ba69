"""The record ring of jump-optimised ``record`` probes (issue 11): shared memory, one consumer.

Producers are the tracee's threads, in the record routine (x86/record.py): they reserve a
record by compare-and-swap on the header's head, drop and count it in ``lost`` when the ring is
full (never blocking), write it and publish its commit word last. The consumer is the tracer:
drain() reads the committed records after the tail in bulk, converts each TSC to ns with the
calibration taken when the ring was made, maps each thread key (the TCB pointer, %fs:0) to a
tid, and publishes the new tail. Nothing on either side takes a system call.

Bounds: one ring per process image, CAPACITY records (a power of two) of RECORD_SIZE bytes; a
routine page (r-x, one page) and the ring (a memfd, rw-, mapped by both). Records that arrive
while nobody drains are lost once CAPACITY are waiting; lost counts them.
"""
from __future__ import annotations

import ctypes
import gc
from collections import Counter
from itertools import repeat
import mmap
import struct
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from ..slots import PAGE_SIZE
from ..tracee import ProcessExited
from ..x86.record import (RECORD_SIZE, RING_HEADER, RING_HEADER_SIZE, RING_MAGIC,
                          RECORD_ACTION_ROUTINE_OFFSET, RING_VERSION, TSC_READER, argument_registers,
                          record_action_routine, record_routine, thread_key)
from ..x86.record import HEAD_OFFSET, LOST_OFFSET, TAIL_OFFSET
from ..x86.shadow import RETURN_RECORD_FLAG

if TYPE_CHECKING:
    from ..tracee import Snapshot, Tracee
    from .slothost import TraceeSlotHost

DEFAULT_CAPACITY = 1 << 13  # records: 640 KiB
_WORD = struct.Struct("<Q")
_ID_WORD = 3  # a record's probe id, in words (RECORD)
CALIBRATION_SECONDS = 0.05


class Record(NamedTuple):
    """One hit of a record probe: when (CLOCK_MONOTONIC ns), which thread, which probe, and the
    six integer argument registers (rdi, rsi, rdx, rcx, r8, r9: the System V arguments).
    A named tuple: the consumer makes millions a second."""

    time_ns: int
    tid: int
    probe: Any
    args: tuple[int, ...]


class ReturnRecord(NamedTuple):
    """One return of an in-process return probe with action="record" (inprocess_returns.py):
    when it returned (CLOCK_MONOTONIC ns), which thread, which ReturnProbe, the return value
    (rax), the call's latency in ns (entry to return, the trampolines' measured overhead
    subtracted: it started at about time_ns - latency_ns) and the call's first four integer
    arguments (rdi, rsi, rdx, rcx) as they were at entry."""

    time_ns: int
    tid: int
    probe: Any
    retval: int
    latency_ns: int
    args: tuple[int, ...]


class _TscClock:
    """rdtsc in the tracer itself (a few bytes of machine code in an executable page), to
    calibrate the tracee's timestamps against time.monotonic_ns()."""

    _read: Any = None
    _page: mmap.mmap | None = None

    @classmethod
    def read(cls) -> int:
        if cls._read is None:
            page = mmap.mmap(-1, PAGE_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            page.write(TSC_READER)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            cls._page, cls._read = page, ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
        return cls._read()

    @classmethod
    def sample(cls, tries: int = 8) -> tuple[int, int]:
        """(a TSC, the monotonic ns at it): the reading bracketed most tightly by two clock reads
        of TRIES (a preemption between a TSC read and its clock read shifts every converted time
        by as much: hundreds of µs on a loaded machine)."""
        best = None
        for _ in range(tries):
            before = time.monotonic_ns()
            tsc = cls.read()
            after = time.monotonic_ns()
            if best is None or after - before < best[0]:
                best = (after - before, tsc, (before + after) // 2)
        return best[1], best[2]

    @classmethod
    def calibrate(cls) -> tuple[float, int, int]:
        """(ns per tick, a TSC, the monotonic ns at that TSC), from two samples ~50 ms apart."""
        tsc0, ns0 = cls.sample()
        time.sleep(CALIBRATION_SECONDS)
        tsc1, ns1 = cls.sample()
        return (ns1 - ns0) / max(tsc1 - tsc0, 1), tsc0, ns0


class Ring:
    """The ring and record routine of one process image; probe ids; the consumer's state."""

    def __init__(self, host: "TraceeSlotHost", tracee: "Tracee", capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0 or capacity & (capacity - 1):
            raise ValueError(f"ring capacity {capacity} is not a power of two")
        self.host = host
        self.tracee = tracee
        self.capacity = capacity
        self.size = self.size_for(capacity)
        self.address = 0          # the ring in the tracee (0: not made yet)
        self.routine = 0          # the record routine's page in the tracee
        self.view: mmap.mmap | None = None
        self.tail = 0
        self.probes: list[Any] = []        # probe id -> the Probe recorded under it
        self._ids: dict[Any, int] = {}     # Probe -> its id
        self.keys: dict[int, int] = {}     # thread key -> tid
        self.ns_per_tick, self.tsc0, self.ns0 = 1.0, 0, 0
        # drained, not yet handed out by records(), in order: raw records (bytes) and those
        # recorded at breakpoints (lists)
        self._batches: list[bytes | list[Record]] = []
        self.lost_before = 0              # lost by rings of images gone (exec)
        self.returns: Any = None  # the in-process return probes, which decode return records
        self.recorded: Counter[int] = Counter()  # probe id -> records drained, not yet taken as hits
        # the consumer's work: records copied out of the ring and decoded, time spent at each
        self.stats = {"drained": 0, "drain_ns": 0, "decoded": 0, "decode_ns": 0}

    @staticmethod
    def size_for(capacity: int) -> int:
        return -(-(RING_HEADER_SIZE + capacity * RECORD_SIZE) // PAGE_SIZE) * PAGE_SIZE

    # ------------------------------------------------------------------ making
    def ensure(self, near: int) -> int:
        """The routine's address, making the ring and routine at the first call."""
        if self.address:
            return self.routine
        self.ns_per_tick, self.tsc0, self.ns0 = _TscClock.calibrate()
        address, view, routine = self.host.map_shared_with_code(near, "pyprobes-records", self.size)
        RING_HEADER.pack_into(view, 0, RING_MAGIC, RING_VERSION, RECORD_SIZE, self.capacity,
                              self.ns_per_tick, self.tsc0, self.ns0)
        code = record_routine(routine, address, self.capacity)
        assert len(code) <= RECORD_ACTION_ROUTINE_OFFSET
        self.tracee.memory.write(routine, code)
        action = routine + RECORD_ACTION_ROUTINE_OFFSET
        self.tracee.memory.write(action, record_action_routine(action, address, self.capacity))
        self.address, self.routine, self.view, self.tail = address, routine, view, 0
        return routine

    @property
    def action_routine(self) -> int:
        """The record action's routine (record_action_trampoline calls it), once ensure() made it."""
        return self.routine + RECORD_ACTION_ROUTINE_OFFSET

    def probe_id(self, probe: Any) -> int:
        """PROBE's id in its records (one per probe, kept while the image lives: records of a
        probe removed meanwhile still name it)."""
        pid = self._ids.get(probe)
        if pid is None:
            pid = self._ids[probe] = len(self.probes)
            self.probes.append(probe)
        return pid

    def breakpoint_handler(self, probe: Any) -> Callable[[int, Any], None]:
        """PROBE's pre-handler while its point is a breakpoint (before the optimizer's freeze,
        or where no jump fits): the tracer records the hit itself, so records stay exact."""
        def record(tid: int, regs: Any) -> None:
            self.append(Record(time.monotonic_ns(), tid, probe, argument_registers(regs)))
        return record

    def append(self, record: Any) -> None:
        """A record made by the tracer (at a breakpoint), handed out in order with the ring's."""
        batches = self._batches
        if not batches or type(batches[-1]) is bytes:
            batches.append([])
        batches[-1].append(record)

    def contains(self, address: int) -> bool:
        """Whether ADDRESS is in the record routine (a thread there returns to a trampoline)."""
        return bool(self.routine) and self.routine <= address < self.routine + PAGE_SIZE

    def learn(self, snapshot: "Snapshot") -> None:
        """Thread keys of every thread in a freeze's SNAPSHOT (those that were there before us)."""
        for tid, regs in snapshot.regs.items():
            key = thread_key(regs)
            if key:  # 0: before the C library set up the thread's TLS
                self.keys[key] = tid

    # ------------------------------------------------------------------ consuming
    @property
    def lost(self) -> int:
        own = _WORD.unpack_from(self.view, LOST_OFFSET)[0] if self.view is not None else 0
        return self.lost_before + own

    def drain(self) -> int:
        """Move every committed record after the tail into pending; publish the new tail."""
        view = self.view
        if view is None:
            return 0
        head = _WORD.unpack_from(view, HEAD_OFFSET)[0]
        tail, mask = self.tail, self.capacity - 1
        if head == tail:
            return 0
        started = time.perf_counter_ns()
        count = 0
        while tail < head:
            first = tail & mask
            n = min(head - tail, self.capacity - first)
            start = RING_HEADER_SIZE + first * RECORD_SIZE
            # The commit words first, the records after: loads are not reordered with older
            # loads on x86, and one copy's internal order is memcpy's.
            commits = memoryview(view)[start:start + n * RECORD_SIZE].cast("Q")[::RECORD_SIZE // 8].tolist()
            ready = 0
            for i, commit in enumerate(commits):
                if commit != tail + i + 1:
                    break
                ready += 1
            if ready:  # copied out now, decoded when asked for: the ring frees at memcpy speed
                batch = bytes(view[start:start + ready * RECORD_SIZE])
                self._batches.append(batch)
                self._count(batch)
            tail += ready
            count += ready
            if ready < n:
                break
        self.tail = tail
        _WORD.pack_into(view, TAIL_OFFSET, tail)
        self.stats["drained"] += count
        self.stats["drain_ns"] += time.perf_counter_ns() - started
        return count

    def _count(self, batch: bytes) -> None:
        """Add BATCH's records to ``recorded``, per probe id: the hits of the record action, which
        counts only its drops in the process (engine/optimizer.py)."""
        ids = memoryview(batch).cast("Q")[_ID_WORD::RECORD_SIZE // 8].tolist()
        first = ids[0]
        if ids.count(first) == len(ids):  # one probe: the usual batch, counted at C speed
            self.recorded[first] += len(ids)
        else:
            self.recorded.update(ids)

    def _decode(self, data: bytes) -> list[Record]:
        """Records from DATA (whole committed records), column by column: every step but the
        time conversion runs in C (slicing, map, zip), some 10x faster than a loop per record."""
        collecting = gc.isenabled()
        if collecting:  # millions of tuples with no cycle: the collector's passes over them cost 3x
            gc.disable()
        started = time.perf_counter_ns()
        try:
            return self._columns(data)
        finally:
            self.stats["decoded"] += len(data) // RECORD_SIZE
            self.stats["decode_ns"] += time.perf_counter_ns() - started
            if collecting:
                gc.enable()

    def _columns(self, data: bytes) -> list[Record]:
        words = memoryview(data).cast("Q")
        step = RECORD_SIZE // 8
        keys = self.keys
        thread_keys = words[2::step].tolist()
        if not keys.keys() >= set(thread_keys):
            self._resolve()
            for key in thread_keys:
                keys.setdefault(key, 0)  # a thread gone before we saw its key: tid 0
        scale, base = self.ns_per_tick, self.ns0 - self.tsc0 * self.ns_per_tick
        times = [int(base + tsc * scale) for tsc in words[1::step].tolist()]
        owners = self.probes
        args = zip(*(words[i::step].tolist() for i in range(4, 10)))
        ids = words[3::step].tolist()
        if ids and max(ids) & RETURN_RECORD_FLAG:
            return self._with_returns(words[1::step].tolist(), times, thread_keys, ids, list(args))
        return list(map(tuple.__new__, repeat(Record),
                        zip(times, map(keys.__getitem__, thread_keys),
                            map(owners.__getitem__, ids), args)))

    def _with_returns(self, tscs: list[int], times: list[int], thread_keys: list[int],
                      ids: list[int], args: list[tuple[int, ...]]) -> list[Any]:
        """Records some of which are return records (the probe id's RETURN_RECORD_FLAG): one at a time."""
        scale, base = self.ns_per_tick, self.ns0 - self.tsc0 * self.ns_per_tick

        def to_ns(tsc: int) -> int:
            return int(base + tsc * scale)
        out: list[Any] = []
        for tsc, when, key, pid, a in zip(tscs, times, thread_keys, ids, args):
            tid = self.keys[key]
            if pid & RETURN_RECORD_FLAG:
                out.append(self.returns.return_record(tsc, tid, self.probes[pid & ~RETURN_RECORD_FLAG], a, to_ns))
            else:
                out.append(Record(when, tid, self.probes[pid], a))
        return out

    def _resolve(self) -> None:
        """Learn the keys of new threads (read at their first stop) and, with a freeze, those of
        threads that were there before pyprobes (their TLS set up after our first freeze)."""
        keys = self.keys
        for tid, key in self.tracee.thread_pointers.items():
            keys.setdefault(key, tid)
        tracee = self.tracee
        if tracee.alive and not tracee.frozen:
            try:
                snapshot = tracee.freeze()
            except (OSError, ProcessExited):
                return
            try:
                self.learn(snapshot)
            finally:
                tracee.thaw()

    def take(self) -> list[Record]:
        """Drain, then hand out every record drained since the last take(), decoded."""
        self.drain()
        batches, self._batches = self._batches, []
        out: list[Record] = []
        for batch in batches:
            out.extend(self._decode(batch) if type(batch) is bytes else batch)
        return out

    # ------------------------------------------------------------------ ending
    def forget(self) -> None:
        """The image is gone (exec) or we detach: drain the last records, close our view."""
        if self.view is None:
            return
        self._batches = [self.take()]  # decoded while this image's probe ids and keys hold
        self.lost_before = self.lost
        self.view.close()
        self.view = None
        self.address = self.routine = 0
        self._ids.clear()
        self.probes.clear()
        self.keys.clear()
        self.recorded.clear()

    def release(self) -> None:
        """Detach: no thread is in the routine (migrated): unmap the routine and the ring."""
        if not self.address:
            return
        routine, address = self.routine, self.address
        self.forget()
        self.host.unmap_page(routine)
        self.host.unmap_page(address, self.size)
