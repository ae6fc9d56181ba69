"""`trace --perfetto FILE`: the file parses with the perfetto package's protos into one track per
thread, one complete slice per call (nested as the calls were), and instants carrying the hit's
arguments; and it is written in batches while the trace runs."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

import pytest

from cli2_util import CLI, cli, notes

pb = pytest.importorskip("perfetto.protos.perfetto.trace.perfetto_trace_pb2")


@dataclass
class Slice:
    name: str
    begin: int
    end: int
    depth: int
    args: dict
    children: list["Slice"] = field(default_factory=list)


@dataclass
class Track:
    tid: int | None
    pid: int | None
    name: str
    thread_name: str
    slices: list[Slice] = field(default_factory=list)
    instants: list[tuple[int, str, dict]] = field(default_factory=list)


def annotation_value(a):
    kind = a.WhichOneof("value")
    if kind is not None:
        return getattr(a, kind)
    if a.dict_entries:
        return {e.name: annotation_value(e) for e in a.dict_entries}
    return [annotation_value(x) for x in a.array_values]


def read_timeline(path) -> dict[int, Track]:
    """The tracks of a Perfetto file by uuid, built as the trace processor builds them: events
    in timestamp order (stable), a BEGIN opens a slice on its track, an END closes the latest."""
    trace = pb.Trace.FromString(open(path, "rb").read())
    tracks: dict[int, Track] = {}
    names: dict[int, str] = {}
    events = []
    for order, packet in enumerate(trace.packet):
        assert packet.trusted_packet_sequence_id == 1
        for entry in packet.interned_data.event_names:
            names[entry.iid] = entry.name
        if packet.HasField("track_descriptor"):
            d = packet.track_descriptor
            thread = d.thread if d.HasField("thread") else None
            tracks[d.uuid] = Track(thread.tid if thread else None, (thread or d.process).pid, d.name,
                                   thread.thread_name if thread else "")
        if packet.HasField("track_event"):
            events.append((packet.timestamp, order, packet.track_event))
    assert trace.packet[0].HasField("clock_snapshot")
    assert trace.packet[0].trace_packet_defaults.timestamp_clock_id == pb.BUILTIN_CLOCK_MONOTONIC
    open_slices: dict[int, list[Slice]] = {}
    for time_ns, _, event in sorted(events, key=lambda e: e[:2]):
        track = tracks[event.track_uuid]
        args = {a.name: annotation_value(a) for a in event.debug_annotations}
        stack = open_slices.setdefault(event.track_uuid, [])
        if event.type == pb.TrackEvent.TYPE_SLICE_BEGIN:
            s = Slice(names[event.name_iid], time_ns, -1, len(stack), args)
            (stack[-1].children if stack else track.slices).append(s)
            stack.append(s)
        elif event.type == pb.TrackEvent.TYPE_SLICE_END:
            stack.pop().end = time_ns
        else:
            assert event.type == pb.TrackEvent.TYPE_INSTANT
            track.instants.append((time_ns, names[event.name_iid], args))
    assert not any(open_slices.values()), "a slice was never closed"
    return tracks


def all_slices(slices):
    for s in slices:
        yield s
        yield from all_slices(s.children)


def program_threads(stdout: str) -> dict[int, tuple[str, int, int]]:
    """pf_work's own report: tid -> (thread name, work calls, marks)."""
    return {int(m[1]): (m[2], int(m[3]), int(m[4]))
            for m in re.finditer(r"thread (\d+) (\S+) work (\d+) mark (\d+)", stdout)}


@pytest.fixture(scope="module")
def pf_work(build):
    return str(build("pf_work.c", "-pthread"))


def test_one_nested_slice_per_call_and_instants_with_arguments(pf_work, tmp_path):
    rounds, depth = 4, 3
    out = tmp_path / "t.pftrace"
    r = cli("trace", "--raw", "--perfetto", str(out), "work", "work%return", "mark", "--", pf_work, "0",
            str(rounds), str(depth))
    assert r.returncode == 0, r.stderr
    (tid, (thread_name, calls, marks)), = program_threads(r.stdout).items()
    assert calls == rounds * (depth + 1) and marks == rounds
    assert f"{calls} calls and {marks} hits written to {out}" in notes(r.stderr)[-1]
    assert not re.search(r"^\s*\d+\.\d+\s+\d+ ", r.stderr, re.M)  # the timeline replaces the lines
    tracks = [t for t in read_timeline(out).values() if t.tid is not None]
    assert len(tracks) == 1
    track, = tracks
    assert track.tid == tid and str(tid) in track.name and thread_name == track.thread_name == "pfw-0"
    slices = list(all_slices(track.slices))
    assert len(slices) == calls  # the entry probe on work adds no instant: the call's slice stands for it
    assert all(s.name.endswith(":work") and s.begin < s.end for s in slices)
    # Each round: work(3) holding work(2) holding work(1) holding work(0), returning 6, 3, 1, 0.
    assert len(track.slices) == rounds
    for outer in track.slices:
        chain = [outer]
        while chain[-1].children:
            assert len(chain[-1].children) == 1
            chain.append(chain[-1].children[0])
        assert [s.depth for s in chain] == list(range(depth + 1))
        assert [s.args["retval"] for s in chain] == [hex(sum(range(n + 1))) for n in range(depth, -1, -1)]
        for parent, child in zip(chain, chain[1:]):
            assert parent.begin < child.begin < child.end < parent.end
    assert [t for t, _, _ in track.instants] == sorted(t for t, _, _ in track.instants)
    assert [(name.split(":")[-1], args["rdi"], args["rsi"]) for _, name, args in track.instants] == \
        [("mark", "0x0", hex(i)) for i in range(rounds)]
    rounds_at = [outer.end for outer in track.slices]
    assert all(end < t for end, (t, _, _) in zip(rounds_at, track.instants))  # mark follows its round's work


def test_a_track_per_thread(pf_work, tmp_path):
    threads, rounds = 3, 5
    out = tmp_path / "t.pftrace"
    r = cli("trace", "--perfetto", str(out), "work%return", "--", pf_work, str(threads), str(rounds), "0")
    assert r.returncode == 0, r.stderr
    truth = program_threads(r.stdout)
    assert len(truth) == threads
    tracks = {t.tid: t for t in read_timeline(out).values() if t.tid is not None and t.slices}
    assert set(tracks) == set(truth)
    for tid, (name, calls, _) in truth.items():
        track = tracks[tid]
        assert track.thread_name == name and track.name == f"{name} {tid}"
        assert len(list(all_slices(track.slices))) == calls == rounds
        assert all(not s.children and s.begin < s.end for s in track.slices)
    pids = {t.pid for t in tracks.values()}
    assert len(pids) == 1 and pids != {None}


def test_recorded_hits_become_instants_and_o_keeps_the_lines(pf_work, tmp_path):
    """Without a %return probe the entry is recorded in the process where it can be: its records
    are the instants, on their threads' tracks; -o FILE still gets the JSON lines."""
    threads, rounds = 2, 30
    out, lines = tmp_path / "t.pftrace", tmp_path / "lines.jsonl"
    r = cli("trace", "--raw", "--json", "-o", str(lines), "--perfetto", str(out), "mark", "--", pf_work, str(threads),
            str(rounds), "0")
    assert r.returncode == 0, r.stderr
    truth = program_threads(r.stdout)
    tracks = {t.tid: t for t in read_timeline(out).values() if t.tid is not None}
    assert set(tracks) == set(truth)
    import json
    hits = [json.loads(x) for x in lines.read_text().splitlines()]
    assert len(hits) == threads * rounds
    for tid, (name, _, marks) in truth.items():
        instants = tracks[tid].instants
        assert len(instants) == marks == rounds
        who = int(name.split("-")[1])
        assert [(args["rdi"], args["rsi"]) for _, _, args in instants] == [(hex(who), hex(i)) for i in range(rounds)]
        assert [h["args"][:2] for h in hits if h["tid"] == tid] == [[who, i] for i in range(rounds)]


def test_attached_with_p(pf_work, tmp_path):
    """-p PID: the calls made after the probes are in, each a slice on the attached thread's track."""
    rounds, depth = 6, 2
    out = tmp_path / "t.pftrace"
    fx = subprocess.Popen([pf_work, "0", "-1", str(depth)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
    pp = None
    try:
        assert fx.stdout.readline() == "ready\n"
        pp = subprocess.Popen([*CLI, "trace", "-v", "--perfetto", str(out), "-p", str(fx.pid), "work%return"],
                              stderr=subprocess.PIPE, text=True)
        while " -> " not in (line := pp.stderr.readline()):
            assert line, "pyprobes ended before placing its probe"
        fx.stdin.write("round\n" * rounds)
        fx.stdin.close()  # the fixture ends after its rounds, and pyprobes with it
        (tid, (_, calls, _)), = program_threads(fx.stdout.read()).items()
        assert fx.wait(timeout=30) == 0
        _, err = pp.communicate(timeout=30)
        assert pp.returncode == 0, err
    finally:
        for p in (pp, fx):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert calls == rounds * (depth + 1)
    track, = [t for t in read_timeline(out).values() if t.tid is not None]
    assert track.tid == tid == track.pid and track.thread_name == "pfw-0"
    assert len(track.slices) == rounds and len(list(all_slices(track.slices))) == calls


def test_typed_arguments_are_typed_annotations(pf_work, tmp_path):
    """With debug info the instants carry the parameters by name and type, as trace --json shows them."""
    rounds = 3
    out = tmp_path / "t.pftrace"
    r = cli("trace", "--perfetto", str(out), "mark", "--", pf_work, "0", str(rounds), "0")
    assert r.returncode == 0, r.stderr
    track, = [t for t in read_timeline(out).values() if t.tid is not None]
    assert [args for _, _, args in track.instants] == [{"who": 0, "round": i} for i in range(rounds)]


def test_unwritable_file_is_one_line(pf_work, tmp_path):
    r = cli("trace", "--perfetto", str(tmp_path / "no" / "such" / "dir.pftrace"), "work", "--", pf_work)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("pyprobes: cannot write") and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ the writer alone
def test_writer_appends_a_batch_at_a_time(tmp_path):
    from pyprobes.cli.perfetto import Timeline

    path = tmp_path / "t.pftrace"
    batch = 16
    timeline = Timeline(str(path), batch_packets=batch)
    sizes, written = [], 0
    for i in range(200):
        timeline.call(1_000_000 + 10 * i + 5, 5, 4242, "f", {"retval": i})
        written += 2 + (i == 0) * 2  # BEGIN and END; before the first, a process and a thread track
        assert len(timeline.batch.packet) <= batch  # what is held in memory
        sizes.append(path.stat().st_size)
    # Nothing is written until a batch is full; then the file grows by whole batches.
    first = next(i for i, s in enumerate(sizes) if s)
    assert 0 < first < batch and sorted(sizes) == sizes and len(set(sizes)) >= written // batch
    held = len(timeline.batch.packet)
    timeline.close()
    trace = pb.Trace.FromString(path.read_bytes())
    assert len(trace.packet) == 1 + written and held == (1 + written) % batch
    track, = [t for t in read_timeline(path).values() if t.tid == 4242]
    assert [(s.begin, s.end, s.args) for s in track.slices] == \
        [(1_000_000 + 10 * i, 1_000_000 + 10 * i + 5, {"retval": i}) for i in range(200)]


def test_annotation_values_by_type(tmp_path):
    from pyprobes.cli.perfetto import Timeline

    path = tmp_path / "t.pftrace"
    timeline = Timeline(str(path))
    values = {"i": -3, "u": (1 << 64) - 1, "d": 2.5, "s": "x", "none": None, "b": True,
              "dict": {"a": 1, "b": "y"}, "list": [1, "z"]}
    timeline.hit(5, 4242, "p", values)
    timeline.returned.add("q")
    timeline.hit(6, 4242, "q", {})  # the entry of a function with a %return probe: its slice stands for it
    timeline.close()
    assert (timeline.hits, timeline.calls) == (1, 0)
    track, = [t for t in read_timeline(path).values() if t.tid == 4242]
    assert track.instants == [(5, "p", {**values, "none": "null"})]
