"""Stacks in the CLI: `trace --stack` (frames under each hit) and `count --stacks [--folded]`
(distinct stacks per probe, or flame-graph folded stacks: `root;...;leaf COUNT`)."""
from __future__ import annotations

from collections import Counter

UNWIND_FAILED = "[unwind failed]"  # a hit whose stack could not be read still counts once


def frames_of(session, tid: int, regs) -> tuple[str, ...]:
    """The names of the hit's frames, innermost first (Process.stack, from a pre-handler)."""
    try:
        return tuple(f.name for f in session.proc.stack(tid, regs))
    except OSError:
        return (UNWIND_FAILED,)  # the thread's memory went away (exiting)


def frame_lines(frames: tuple[str, ...]) -> str:
    """A hit's frames as `trace --stack` prints them under its line."""
    return "".join(f"{'':21}#{i:<3} {name}\n" for i, name in enumerate(frames))


def _function(frame: str) -> str:
    head, sep, tail = frame.rpartition("+0x")
    return head if sep and all(c in "0123456789abcdef" for c in tail) else frame


class StackCounts:
    """Distinct stacks per probe name, counted by `count --stacks`."""

    def __init__(self) -> None:
        self.by_probe: dict[str, Counter] = {}

    def pre_for(self, session):
        def pre_for(target):
            counts = self.by_probe.setdefault(target.name, Counter())

            def on_hit(tid, regs):
                counts[frames_of(session, tid, regs)] += 1
            return on_hit
        return pre_for

    def as_json(self, probe: str) -> list[dict]:
        counts = self.by_probe.get(probe, Counter())
        return [{"frames": list(frames), "count": n} for frames, n in counts.most_common()]

    def text(self) -> str:
        out = []
        for probe, counts in self.by_probe.items():
            total = sum(counts.values())
            out.append(f"{probe}: {total} hits, {len(counts)} distinct stack{'s' * (len(counts) != 1)}\n")
            for frames, n in counts.most_common():
                out.append(f"{n:>10}  {frames[0]}\n")
                out.extend(f"{'':12}{name}\n" for name in frames[1:])
        return "".join(out)

    def folded(self) -> str:
        """One line per distinct stack, root first: what flamegraph.pl, speedscope and Perfetto
        read. Frames are functions (module:symbol, no offset: a flame graph merges a function's
        call sites); the counts add up to the hits of the probes."""
        lines: Counter = Counter()
        for counts in self.by_probe.values():
            for frames, n in counts.items():
                lines[";".join(_function(name).replace(";", ",") for name in reversed(frames))] += n
        return "".join(f"{stack} {n}\n" for stack, n in sorted(lines.items()))
