"""A latency histogram in the buckets the in-process return trampoline fills (x86/shadow.py).

One type for both ways latencies arrive: the stop-based return probe adds them one by one
(`add`), the in-process one keeps bucket counts in tracee memory, read back whole
(`from_buckets`). Both give the same percentiles, the same bpftrace-style log2 rows, and
histograms that subtract: the histogram of an interval is `now - then`.

Buckets (`latency_bucket`): 0..7 ns exactly, then each power of two [2**b, 2**(b+1)) split into
8 equal buckets, so a bucket is at most 1/8 as wide as the smallest value it holds, and below
16 ns one value wide.
"""
from __future__ import annotations

from typing import Sequence

from ..x86.shadow import BUCKETS, bucket_bounds, latency_bucket

__all__ = ["LatencyHistogram"]

MAX_NS = (1 << 64) - 1  # the last bucket's top: what a u64 in the tracee can hold


def _log2_row(index: int) -> int:
    """The bpftrace hist() bucket that holds sub-bucket INDEX entirely: 0 holds 0, k >= 1
    holds [2**(k-1), 2**k)."""
    return index.bit_length() if index < 8 else index // 8 + 3


class LatencyHistogram:
    """Latencies in nanoseconds, counted in BUCKETS buckets (x86/shadow.py's scheme).

    `min` and `max` are exact for values added one by one. Where only bucket counts are known
    (`from_buckets`, a `difference`) they are the nearest bucket bound that is sure to hold:
    the lowest used bucket's low end, the highest used bucket's top value, narrowed by any
    exact value known.
    """

    __slots__ = ("buckets", "count", "sum", "_min", "_max")

    def __init__(self) -> None:
        self.buckets: list[int] = [0] * BUCKETS
        self.count = 0
        self.sum = 0
        self._min: int | None = None
        self._max: int | None = None

    # ------------------------------------------------------------------ filling
    def add(self, ns: int) -> None:
        """One latency of NS nanoseconds (below 0 counts as 0, beyond a u64 as its maximum)."""
        ns = min(max(int(ns), 0), MAX_NS)
        self.buckets[latency_bucket(ns)] += 1
        self.count += 1
        self.sum += ns
        if self._min is None or ns < self._min:
            self._min = ns
        if self._max is None or ns > self._max:
            self._max = ns

    @classmethod
    def from_buckets(cls, buckets: Sequence[int], count: int | None = None, sum_ns: int = 0,
                     max_ns: int | None = None) -> "LatencyHistogram":
        """The histogram of bucket counts BUCKETS (index: `latency_bucket`), with the COUNT of
        values (default: the buckets' total), their SUM_NS and their exact MAX_NS if known.

        COUNT may differ from the buckets' total by the few values a reader running alongside
        the writer saw half-counted; percentiles rank within the buckets' own total."""
        if len(buckets) > BUCKETS:
            raise ValueError(f"{len(buckets)} buckets: the scheme has {BUCKETS}")
        if any(n < 0 for n in buckets):
            raise ValueError("a bucket count is negative")
        hist = cls()
        hist.buckets[:len(buckets)] = [int(n) for n in buckets]
        hist.count = sum(hist.buckets) if count is None else int(count)
        hist.sum = int(sum_ns)
        used = hist._used()
        if used is not None:
            hist._min = bucket_bounds(used[0])[0]
            hist._max = bucket_bounds(used[1])[1] - 1 if max_ns is None else int(max_ns)
        return hist

    def copy(self) -> "LatencyHistogram":
        hist = LatencyHistogram()
        hist.buckets = self.buckets.copy()
        hist.count, hist.sum, hist._min, hist._max = self.count, self.sum, self._min, self._max
        return hist

    # ------------------------------------------------------------------ combining
    def merge(self, other: "LatencyHistogram") -> "LatencyHistogram":
        """The values of both."""
        hist = LatencyHistogram()
        hist.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]
        hist.count = self.count + other.count
        hist.sum = self.sum + other.sum
        mins = [m for m in (self._min, other._min) if m is not None]
        maxes = [m for m in (self._max, other._max) if m is not None]
        hist._min = min(mins) if mins else None
        hist._max = max(maxes) if maxes else None
        return hist

    def difference(self, earlier: "LatencyHistogram") -> "LatencyHistogram":
        """The values added since EARLIER, a past state of this histogram (an interval's
        histogram is `now.difference(then)`). A new minimum or maximum is exact: it was added
        in the interval; otherwise the bound of the interval's lowest or highest bucket."""
        buckets = [a - b for a, b in zip(self.buckets, earlier.buckets)]
        if any(n < 0 for n in buckets):
            raise ValueError("not an earlier state of this histogram: a bucket would go negative")
        hist = LatencyHistogram()
        hist.buckets = buckets
        hist.count = self.count - earlier.count
        hist.sum = self.sum - earlier.sum
        used = hist._used()
        if used is None:
            return hist
        if earlier._min is None or (self._min is not None and self._min < earlier._min):
            hist._min = self._min
        else:
            hist._min = max(bucket_bounds(used[0])[0], self._min if self._min is not None else 0)
        if earlier._max is None or (self._max is not None and self._max > earlier._max):
            hist._max = self._max
        else:
            top = bucket_bounds(used[1])[1] - 1
            hist._max = top if self._max is None else min(top, self._max)
        return hist

    __add__ = merge
    __sub__ = difference

    # ------------------------------------------------------------------ reading
    @property
    def min(self) -> int | None:
        return self._min

    @property
    def max(self) -> int | None:
        return self._max

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def percentile(self, q: float) -> float | None:
        """The Q-th percentile (0 <= Q <= 100), None when empty.

        The bucket is exact: it is the one holding the nearest-rank percentile (the smallest
        value with at least ceil(Q/100 * n) values at or below it); within it the value is
        interpolated as if its values were spread evenly, then kept within [min, max]. So the
        answer is off by less than the bucket's width: exact below 16 ns, and above less than
        1/8 of the true value."""
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q}: must be within 0..100")
        total = sum(self.buckets)
        if not total:
            return None
        target = q / 100 * total
        below = 0
        for index, n in enumerate(self.buckets):
            if n and below + n >= target:
                low, high = bucket_bounds(index)
                fraction = max(target - below, 0) / n
                value = low + fraction * (high - 1 - low)
                if self._min is not None:
                    value = max(value, self._min)
                if self._max is not None:
                    value = min(value, self._max)
                return float(value)
            below += n
        return float(self._max) if self._max is not None else None  # not reached: target <= total

    def log2_rows(self) -> list[tuple[int, int, int]]:
        """(low, high, count) per bpftrace hist() bucket: [0, 1), then [2**(k-1), 2**k), from
        the lowest used to the highest, empty ones between included."""
        rows: dict[int, int] = {}
        for index, n in enumerate(self.buckets):
            if n:
                k = _log2_row(index)
                rows[k] = rows.get(k, 0) + n
        if not rows:
            return []
        return [((0, 1) if k == 0 else (1 << (k - 1), 1 << k)) + (rows.get(k, 0),)
                for k in range(min(rows), max(rows) + 1)]

    def as_json(self) -> dict:
        """count, min, max, mean (ns, one decimal), p50, p99, and hist: the log2 rows."""
        p50, p99 = self.percentile(50), self.percentile(99)
        return {"count": self.count, "min": self.min, "max": self.max,
                "mean": round(self.sum / self.count, 1) if self.count else None,
                "p50": None if p50 is None else round(p50, 1),
                "p99": None if p99 is None else round(p99, 1),
                "hist": [[lo, hi, n] for lo, hi, n in self.log2_rows()]}

    def _used(self) -> tuple[int, int] | None:
        """The lowest and the highest bucket that hold a value."""
        used = [i for i, n in enumerate(self.buckets) if n]
        return (used[0], used[-1]) if used else None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        return (self.buckets, self.count, self.sum, self._min, self._max) == \
            (other.buckets, other.count, other.sum, other._min, other._max)

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"LatencyHistogram(count={self.count}, sum={self.sum}, min={self._min}, max={self._max})"
