"""`trace --perfetto FILE`: the hits and calls on a Perfetto timeline (ui.perfetto.dev).

One track per thread (its tid and name), a slice per call of a function with a %return
probe, an instant per hit of any other probe, with its arguments as debug annotations.
The file is a Perfetto protobuf trace written with the `perfetto` package's own message
classes: packets are gathered into a Trace message of at most `batch_packets` packets,
which is serialised and appended to the file (concatenated Trace messages are one valid
Trace), so a long trace never grows in memory.
"""
from __future__ import annotations

from typing import IO, Any, Callable, Mapping

from .output import CliError

BATCH_PACKETS = 4096  # packets per Trace message appended to the file: ~0.3 MB of slices
SEQUENCE_ID = 1  # every packet comes from one writer, in order: one packet sequence
NULL = "null"  # None: a value the debug info says is optimised out, or a NULL string
INT64 = 1 << 63


def thread_identity(tid: int, default_pid: int | None) -> tuple[int, str, str]:
    """(pid, thread name, process name) of TID from /proc, read while it lives; a thread gone
    already (records are read in batches) keeps DEFAULT_PID and no names."""
    pid = default_pid if default_pid is not None else tid
    try:
        with open(f"/proc/{tid}/status") as status:
            for line in status:
                if line.startswith("Tgid:"):
                    pid = int(line.split()[1])
                    break
    except (OSError, ValueError):
        return pid, "", ""
    names = []
    for path in (f"/proc/{pid}/task/{tid}/comm", f"/proc/{pid}/comm"):
        try:
            with open(path) as comm:
                names.append(comm.read().rstrip("\n"))
        except OSError:
            names.append("")
    return pid, names[0], names[1]


class Timeline:
    """A Perfetto trace being written to PATH.

    call(end_ns, latency_ns, tid, name, annotations): one call of NAME on thread TID, from
    end_ns - latency_ns to end_ns (a return knows its latency); hit(time_ns, tid, name,
    annotations): an instant. Times are CLOCK_MONOTONIC ns, the clock of time.monotonic_ns()
    and of the records. A probe named in `returned` (its function has a %return probe too) adds
    no instant: the call's slice stands for it."""

    def __init__(self, path: str, batch_packets: int = BATCH_PACKETS) -> None:
        from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb  # 75 ms: only with --perfetto

        try:
            self.file: IO[bytes] = open(path, "wb")
        except OSError as e:
            raise CliError(f"cannot write {path}: {e.strerror}", 2) from None
        self.path = path
        self.pb = pb
        self.batch_packets = batch_packets
        self.batch = pb.Trace()
        self.returned: set[str] = set()
        self.default_pid: int | None = None  # the traced process, for threads gone before they are seen
        self.name_of: Callable[[int], str] | None = None  # their names, remembered by the tracer
        self.calls = 0
        self.hits = 0
        self._threads: dict[int, int] = {}  # tid -> its track's uuid
        self._processes: dict[int, int] = {}  # pid -> its track's uuid
        self._names: dict[str, int] = {}  # event name -> its interned id
        self._start_sequence()

    # ------------------------------------------------------------------ the events
    def call(self, end_ns: int, latency_ns: int, tid: int, name: str, annotations: Mapping[str, Any]) -> None:
        track = self._track(tid)
        begin = self._event(end_ns - latency_ns, track, self.pb.TrackEvent.TYPE_SLICE_BEGIN, name)
        self._annotate(begin.track_event, annotations)
        self._event(end_ns, track, self.pb.TrackEvent.TYPE_SLICE_END, None)
        self.calls += 1

    def hit(self, time_ns: int, tid: int, name: str, annotations: Mapping[str, Any]) -> None:
        if name in self.returned:
            return
        packet = self._event(time_ns, self._track(tid), self.pb.TrackEvent.TYPE_INSTANT, name)
        self._annotate(packet.track_event, annotations)
        self.hits += 1

    def flush(self) -> None:
        """Append the packets gathered so far to the file, as one Trace message."""
        if self.batch.packet:
            self.file.write(self.batch.SerializeToString())
            self.batch = self.pb.Trace()
        self.file.flush()

    def close(self) -> None:
        if not self.file.closed:
            self.flush()
            self.file.close()

    # ------------------------------------------------------------------ packets
    def _packet(self):
        if len(self.batch.packet) >= self.batch_packets:
            self.flush()
        packet = self.batch.packet.add()
        packet.trusted_packet_sequence_id = SEQUENCE_ID
        return packet

    def _start_sequence(self) -> None:
        """The first packet: the clocks (CLOCK_MONOTONIC is the trace's clock, BOOTTIME read at the
        same moment for tools that convert to it) and the sequence's defaults: every event's
        timestamp is CLOCK_MONOTONIC, its name an id interned on this sequence."""
        import time

        pb = self.pb
        packet = self._packet()
        packet.first_packet_on_sequence = True
        packet.sequence_flags = pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
        packet.trace_packet_defaults.timestamp_clock_id = pb.BUILTIN_CLOCK_MONOTONIC
        snapshot = packet.clock_snapshot
        snapshot.primary_trace_clock = pb.BUILTIN_CLOCK_MONOTONIC
        for clock_id, clock in ((pb.BUILTIN_CLOCK_MONOTONIC, time.CLOCK_MONOTONIC),
                                (pb.BUILTIN_CLOCK_BOOTTIME, time.CLOCK_BOOTTIME)):
            snapshot.clocks.add(clock_id=clock_id, timestamp=time.clock_gettime_ns(clock))

    def _event(self, time_ns: int, track: int, kind: int, name: str | None):
        packet = self._packet()
        packet.timestamp = max(time_ns, 0)
        packet.sequence_flags = self.pb.TracePacket.SEQ_NEEDS_INCREMENTAL_STATE
        event = packet.track_event
        event.type = kind
        event.track_uuid = track
        if name is not None:
            iid = self._names.get(name)
            if iid is None:
                iid = self._names[name] = len(self._names) + 1
                packet.interned_data.event_names.add(iid=iid, name=name)
            event.name_iid = iid
        return packet

    def _track(self, tid: int) -> int:
        uuid = self._threads.get(tid)
        if uuid is None:
            pid, thread_name, process_name = thread_identity(tid, self.default_pid)
            if not thread_name and self.name_of is not None:
                thread_name = self.name_of(tid)  # gone before its records were read
            if pid not in self._processes:
                self._processes[pid] = self._describe(name=process_name, process=(pid, process_name))
            uuid = self._threads[tid] = self._describe(
                name=f"{thread_name} {tid}".lstrip(), parent=self._processes[pid], thread=(pid, tid, thread_name))
        return uuid

    def _describe(self, name: str, parent: int | None = None, process=None, thread=None) -> int:
        """A TrackDescriptor packet for a new track (a process's, or a thread's under it): its uuid."""
        uuid = len(self._threads) + len(self._processes) + 1
        descriptor = self._packet().track_descriptor
        descriptor.uuid = uuid
        if name:
            descriptor.name = name
        if parent is not None:
            descriptor.parent_uuid = parent
        if process is not None:
            descriptor.process.pid, descriptor.process.process_name = process
        if thread is not None:
            descriptor.thread.pid, descriptor.thread.tid, descriptor.thread.thread_name = thread
        return uuid

    def _annotate(self, event, annotations: Mapping[str, Any]) -> None:
        for key, value in annotations.items():
            annotation = event.debug_annotations.add()
            annotation.name = str(key)
            set_value(annotation, value)


def set_value(annotation, value: Any) -> None:
    """VALUE into a DebugAnnotation by its type: a dict's entries and a list's items nested."""
    if value is None:
        annotation.string_value = NULL
    elif isinstance(value, bool):
        annotation.bool_value = value
    elif isinstance(value, int):
        if -INT64 <= value < INT64:
            annotation.int_value = value
        elif INT64 <= value < 2 * INT64:
            annotation.uint_value = value
        else:
            annotation.string_value = str(value)
    elif isinstance(value, float):
        annotation.double_value = value
    elif isinstance(value, str):
        annotation.string_value = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            entry = annotation.dict_entries.add()
            entry.name = str(key)
            set_value(entry, item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            set_value(annotation.array_values.add(), item)
    else:
        annotation.string_value = str(value)
