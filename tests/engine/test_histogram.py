"""LatencyHistogram: percentiles within the documented bound, merge and difference, the bucket
path agreeing with the one-by-one path, and log2 rows as the CLI's old Histogram drew them."""
from __future__ import annotations

import math
import random

import pytest

from pyprobes import LatencyHistogram
from pyprobes.x86.shadow import BUCKETS, bucket_bounds, latency_bucket


def filled(values) -> LatencyHistogram:
    hist = LatencyHistogram()
    for v in values:
        hist.add(v)
    return hist


def nearest_rank(values: list[int], q: float) -> int:
    """The smallest value with at least ceil(q/100 * n) values at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def old_log2_rows(values) -> list[tuple[int, int, int]]:
    """What cli/output.py's Histogram.rows() gave (bucket k: [2**(k-1), 2**k), 0 for 0)."""
    buckets: dict[int, int] = {}
    for v in values:
        k = max(int(v), 0).bit_length()
        buckets[k] = buckets.get(k, 0) + 1
    if not buckets:
        return []
    return [((0, 1) if k == 0 else (1 << (k - 1), 1 << k)) + (buckets.get(k, 0),)
            for k in range(min(buckets), max(buckets) + 1)]


DATASETS = {
    "small exact": [0, 1, 2, 3, 3, 7, 9, 15, 15, 15],
    "uniform": list(range(1, 10_001)),
    "lognormal": [int(random.Random(7).lognormvariate(8, 2)) for _ in range(5000)],
    "bimodal": [40] * 900 + [1_000_000 + i for i in range(100)],
    "one value": [123_456_789],
}


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("q", [0, 1, 10, 25, 50, 75, 90, 99, 99.9, 100])
def test_percentile_within_the_documented_bound(name, q):
    values = DATASETS[name]
    truth = nearest_rank(values, q)
    got = filled(values).percentile(q)
    assert latency_bucket(int(got)) == latency_bucket(truth)  # the right bucket, always
    if truth < 16:
        assert got == truth
    else:
        assert abs(got - truth) < truth / 8


def test_percentiles_of_a_known_spread():
    hist = filled(range(1000, 2000))  # buckets [1024, 1152) ... 128 wide
    assert hist.percentile(0) == 1000 == hist.min
    assert hist.percentile(100) == 1999 == hist.max
    assert abs(hist.percentile(50) - 1499) <= 128
    assert hist.count == 1000 and hist.sum == sum(range(1000, 2000)) and hist.mean == 1499.5


def test_empty():
    hist = LatencyHistogram()
    assert (hist.count, hist.sum, hist.min, hist.max, hist.mean) == (0, 0, None, None, None)
    assert hist.percentile(50) is None and hist.log2_rows() == []
    assert hist.as_json() == {"count": 0, "min": None, "max": None, "mean": None, "p50": None, "p99": None,
                              "hist": []}
    with pytest.raises(ValueError):
        hist.percentile(101)


def test_add_clamps_to_the_u64_range():
    hist = filled([-5, 1 << 70])
    assert hist.min == 0 and hist.max == (1 << 64) - 1
    assert hist.buckets[0] == 1 and hist.buckets[BUCKETS - 1] == 1


@pytest.mark.parametrize("name", DATASETS)
def test_log2_rows_equal_the_old_histograms(name):
    values = DATASETS[name]
    assert filled(values).log2_rows() == old_log2_rows(values)


def test_log2_rows_every_bucket_edge():
    values = [v for b in range(40) for v in ((1 << b) - 1, 1 << b, (1 << b) + 1)]
    assert filled(values).log2_rows() == old_log2_rows(values)


def test_json_keeps_the_old_keys():
    values = [5, 100, 100, 3000]
    got = filled(values).as_json()
    assert got["count"] == 4 and got["min"] == 5 and got["max"] == 3000 and got["mean"] == 801.2
    assert got["hist"] == [list(r) for r in old_log2_rows(values)]
    assert {"p50", "p99"} <= set(got)


def test_from_buckets_agrees_with_adding():
    values = DATASETS["lognormal"]
    one_by_one = filled(values)
    counts = [0] * BUCKETS
    for v in values:
        counts[latency_bucket(v)] += 1
    read = LatencyHistogram.from_buckets(counts, count=len(values), sum_ns=sum(values), max_ns=max(values))
    assert read.buckets == one_by_one.buckets and read.count == one_by_one.count and read.sum == one_by_one.sum
    assert read.max == max(values) and read.mean == one_by_one.mean
    assert read.min == bucket_bounds(latency_bucket(min(values)))[0] <= min(values)
    assert read.log2_rows() == one_by_one.log2_rows()
    for q in (1, 50, 99):
        truth = nearest_rank(values, q)
        assert abs(read.percentile(q) - truth) <= max(truth / 8, 1)


def test_from_buckets_without_a_max_bounds_it_by_its_bucket():
    read = LatencyHistogram.from_buckets([0] * 100 + [3])
    assert bucket_bounds(100) == (24576, 26624)  # 2**14 + 4/8 of it, 2**14 + 5/8
    assert (read.count, read.min, read.max) == (3, 24576, 26623)
    assert 24576 <= read.percentile(50) <= 26623
    with pytest.raises(ValueError):
        LatencyHistogram.from_buckets([0] * (BUCKETS + 1))


def test_merge():
    a, b = DATASETS["uniform"], DATASETS["bimodal"]
    merged = filled(a).merge(filled(b))
    assert merged == filled(a + b) == filled(a) + filled(b)
    assert merged.percentile(50) == filled(a + b).percentile(50)


def test_difference_is_the_interval():
    before, during = DATASETS["lognormal"][:3000], DATASETS["lognormal"][3000:]
    then = filled(before)
    now = then.copy()
    for v in during:
        now.add(v)
    interval = now - then
    alone = filled(during)
    assert interval.buckets == alone.buckets and interval.count == alone.count and interval.sum == alone.sum
    # min and max: exact where the interval set a new one, else its buckets' bounds around the truth
    assert latency_bucket(interval.min) == latency_bucket(min(during)) and interval.min <= min(during)
    assert latency_bucket(interval.max) == latency_bucket(max(during)) and interval.max >= max(during)
    assert interval.merge(then).buckets == now.buckets


def test_difference_keeps_a_new_extreme_exact():
    then = filled([500, 600])
    now = then.copy()
    for v in (7, 550, 90_001):
        now.add(v)
    interval = now.difference(then)
    assert (interval.min, interval.max, interval.count) == (7, 90_001, 3)
    assert now.difference(now).count == 0 and now.difference(now).percentile(50) is None


def test_difference_refuses_a_histogram_that_is_not_earlier():
    with pytest.raises(ValueError):
        filled([1, 2]).difference(filled([1000]))
