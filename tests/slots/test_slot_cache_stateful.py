"""Stateful property test: random get / free / thread moves / collect.

Bound checked on pages (and why it holds): a page is mapped only when no page
within REACH of `near` has a free slot and none holds garbage (garbage in reach
is collected first, and the collection keeps a page in reach for the waiting
get()).  So at every map, the pages of that neighbourhood are all full of used
slots, and afterwards pages == ceil(used / SLOTS_PER_PAGE).  Pages only ever
grow by mapping, hence, per neighbourhood (neighbourhoods far apart, as here):

    pages(N) <= ceil(peak simultaneously used slots in N / SLOTS_PER_PAGE)

which is tighter than "ceil(peak used / SLOTS_PER_PAGE) + garbage pages + 1".
Freezes: <= ceil(dirty frees / SLOTS_PER_PAGE) + no_free_slot + explicit
collect_garbage() calls that found garbage.
"""
from __future__ import annotations

import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from _slot_fakehost import BASE, GIB, ORIGINAL_CODE, FakeHost
from pyprobes.slots import SLOT_SIZE, SLOTS_PER_PAGE, Slot, SlotCache, in_reach

# Three neighbourhoods 3 GiB apart: no page of one is in reach of another.
CLUSTERS = [BASE, BASE + 3 * GIB, BASE + 6 * GIB]
JITTER = 1 << 20
TIDS = range(1, 6)


def cluster_of(address: int) -> int:
    return min(range(len(CLUSTERS)), key=lambda c: abs(address - CLUSTERS[c]))


class SlotCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.host = FakeHost()
        self.cache = SlotCache(self.host)
        self.live: dict[int, tuple[Slot, int]] = {}  # address -> (slot, cluster)
        self.boosted: set[int] = set()  # live slots a thread ran boosted through
        self.garbage: set[int] = set()  # dirty-freed, not yet collected
        self.dirty_frees = 0
        self.explicit_collections = 0
        self.used_per_cluster = [0] * len(CLUSTERS)
        self.peak_per_cluster = [0] * len(CLUSTERS)
        self.migrations_seen = 0
        self.collections_seen = 0

    # ------------------------------------------------------------ helpers

    def _settle(self) -> None:
        """Account for any collection the last call triggered."""
        collections = self.cache.stats()["collections"]
        log = self.host.migrated_log
        for _tid, rip in log[self.migrations_seen :]:
            # Only threads inside garbage are stepped out; live slots are left alone.
            assert rip - rip % SLOT_SIZE in self.garbage
        self.migrations_seen = len(log)
        if collections != self.collections_seen:
            assert collections == self.collections_seen + 1  # at most one per call
            self.collections_seen = collections
            self.garbage.clear()

    # -------------------------------------------------------------- rules

    @rule(cluster=st.integers(0, len(CLUSTERS) - 1),
          jitter=st.integers(-JITTER, JITTER),
          n=st.integers(1, 150))
    def get(self, cluster: int, jitter: int, n: int) -> None:
        near = CLUSTERS[cluster] + jitter
        for _ in range(n):
            s = self.cache.get(near)
            self._settle()
            assert s.address not in self.live, "slot handed out twice"
            assert s.address not in self.garbage, "garbage reused before a collection"
            assert self.host.threads_in(s.address) == [], "a thread sits in the new slot"
            assert in_reach(s.page, near)
            assert cluster_of(s.page) == cluster
            self.live[s.address] = (s, cluster)
            self.used_per_cluster[cluster] += 1
            self.peak_per_cluster[cluster] = max(
                self.peak_per_cluster[cluster], self.used_per_cluster[cluster]
            )

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 2**32), n=st.integers(1, 150), dirty=st.booleans())
    def free(self, pick: int, n: int, dirty: bool) -> None:
        for k in range(n):
            if not self.live:
                return
            addrs = sorted(self.live)
            address = addrs[(pick + k * 7919) % len(addrs)]
            slot, cluster = self.live.pop(address)
            self.used_per_cluster[cluster] -= 1
            # The engine's duty: a slot ever run boosted, or with a thread in
            # it, is dirty.
            is_dirty = dirty or address in self.boosted or bool(self.host.threads_in(address))
            self.boosted.discard(address)
            if is_dirty:
                self.garbage.add(address)
                self.dirty_frees += 1
            self.cache.free(slot, dirty=is_dirty)
            self._settle()
            assert self.cache.stats()["garbage"] <= SLOTS_PER_PAGE

    @precondition(lambda self: self.live)
    @rule(tid=st.sampled_from(TIDS), pick=st.integers(0, 2**32),
          offset=st.integers(0, SLOT_SIZE - 1))
    def thread_enters_slot(self, tid: int, pick: int, offset: int) -> None:
        addrs = sorted(self.live)
        address = addrs[pick % len(addrs)]
        self.host.threads[tid] = address + offset
        self.boosted.add(address)

    @rule(tid=st.sampled_from(TIDS), offset=st.integers(0, SLOT_SIZE - 1))
    def thread_wanders_within_its_slot(self, tid: int, offset: int) -> None:
        rip = self.host.threads.get(tid)
        if rip is not None and self.cache.contains(rip):
            self.host.threads[tid] = rip - rip % SLOT_SIZE + offset

    @rule(tid=st.sampled_from(TIDS))
    def thread_leaves(self, tid: int) -> None:
        self.host.threads[tid] = ORIGINAL_CODE + tid

    @rule()
    def collect(self) -> None:
        expected = len(self.garbage)
        freezes = self.host.freezes
        assert self.cache.collect_garbage() == expected
        assert self.host.freezes == freezes + (1 if expected else 0)
        if expected:
            self.explicit_collections += 1
        self._settle()
        assert not self.garbage

    # --------------------------------------------------------- invariants

    @invariant()
    def never_frozen_between_calls(self) -> None:
        assert not self.host.frozen and self.host.freezes == self.host.thaws

    @invariant()
    def accounting_matches(self) -> None:
        st_ = self.cache.stats()
        assert st_["slots_used"] == len(self.live)
        assert st_["garbage"] == len(self.garbage)
        assert st_["pages"] == len(self.host.mapped)
        assert st_["freezes"] == self.host.freezes
        assert st_["threads_migrated"] == self.host.migrated_total

    @invariant()
    def live_slots_are_found(self) -> None:
        for address, (slot, _c) in self.live.items():
            assert slot.page in self.host.mapped
            assert self.cache.contains(address + SLOT_SIZE - 1)
            assert self.cache.slot_at(address + 1) == slot

    @invariant()
    def no_thread_in_a_free_slot(self) -> None:
        # Invariant 1: a thread in slot memory is in a slot that is still
        # in use, or in garbage awaiting migration -- never in a free one.
        for rip in self.host.threads.values():
            if self.cache.contains(rip):
                base = rip - rip % SLOT_SIZE
                assert base in self.live or base in self.garbage

    @invariant()
    def freezes_bounded(self) -> None:
        st_ = self.cache.stats()
        bound = (math.ceil(self.dirty_frees / SLOTS_PER_PAGE) + st_["no_free_slot"]
                 + self.explicit_collections)
        assert st_["freezes"] <= bound

    @invariant()
    def pages_bounded(self) -> None:
        per_cluster = [0] * len(CLUSTERS)
        for page in self.host.mapped:
            per_cluster[cluster_of(page)] += 1
        for c, pages in enumerate(per_cluster):
            assert pages <= math.ceil(self.peak_per_cluster[c] / SLOTS_PER_PAGE)
            if self.peak_per_cluster[c]:
                assert pages >= 1  # one page kept per neighbourhood

    def teardown(self) -> None:
        self.host.threads.clear()
        self.cache.release_all()
        assert self.host.mapped == set()
        assert not self.host.frozen


SlotCacheMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSlotCacheStateful = SlotCacheMachine.TestCase
