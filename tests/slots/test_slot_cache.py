"""Unit tests for SlotCache against a fake host (no real tracee)."""
from __future__ import annotations

import dataclasses

import pytest

from _slot_fakehost import BASE, GIB, ORIGINAL_CODE, FakeHost
from pyprobes.slots import (
    PAGE_SIZE,
    REACH,
    SLOT_SIZE,
    SLOTS_PER_PAGE,
    Slot,
    SlotCache,
    SlotMapError,
    in_reach,
)


@pytest.fixture
def host():
    h = FakeHost()
    yield h
    # Whatever a test did, the tracee is never left frozen.
    assert not h.frozen
    assert h.freezes == h.thaws


@pytest.fixture
def cache(host):
    return SlotCache(host)


def fill(cache: SlotCache, n: int, near: int = BASE) -> list[Slot]:
    return [cache.get(near) for _ in range(n)]


def test_constants():
    assert SLOTS_PER_PAGE == PAGE_SIZE // SLOT_SIZE == 128
    assert REACH == 2**31 - PAGE_SIZE


def test_stats_keys(cache):
    assert set(cache.stats()) == {
        "pages", "slots_used", "garbage", "collections", "freezes",
        "threads_migrated", "no_free_slot",
    }
    assert all(v == 0 for v in cache.stats().values())


def test_get_layout_and_lookup(cache, host):
    s = cache.get(BASE)
    assert s.page in host.mapped
    assert s.address == s.page + s.index * SLOT_SIZE
    assert in_reach(s.page, BASE)
    assert cache.contains(s.address) and cache.contains(s.page + PAGE_SIZE - 1)
    assert not cache.contains(s.page - 1) and not cache.contains(s.page + PAGE_SIZE)
    assert cache.slot_at(s.address + SLOT_SIZE - 1) == s
    assert cache.slot_at(s.address + SLOT_SIZE).index == s.index + 1
    assert cache.slot_at(BASE) is None
    assert cache.stats()["slots_used"] == 1 and cache.stats()["pages"] == 1


def test_clean_free_is_reusable_at_once(cache, host):
    s = cache.get(BASE)
    cache.free(s, dirty=False)
    t = cache.get(BASE)
    assert t.address == s.address
    assert t != s  # a fresh handle: the old one cannot free the new owner's slot
    assert host.freezes == 0
    with pytest.raises(ValueError):
        cache.free(s, dirty=False)
    cache.free(t, dirty=False)


def test_dirty_free_not_reused_until_collected(cache, host):
    slots = fill(cache, 3)
    cache.free(slots[1], dirty=True)
    assert cache.stats()["garbage"] == 1
    others = fill(cache, SLOTS_PER_PAGE - 3)  # the rest of the page
    assert slots[1].address not in {o.address for o in others}
    assert host.freezes == 0
    assert cache.collect_garbage() == 1
    assert host.freezes == 1
    again = cache.get(BASE)
    assert again.address == slots[1].address


def test_collect_without_garbage_does_not_freeze(cache, host):
    cache.free(cache.get(BASE), dirty=False)
    assert cache.collect_garbage() == 0
    assert host.freezes == 0 and cache.stats()["freezes"] == 0


def test_double_free_and_foreign_slots(cache, host):
    s = cache.get(BASE)
    cache.free(s, dirty=True)
    with pytest.raises(ValueError):
        cache.free(s, dirty=True)
    with pytest.raises(ValueError):
        cache.free(s, dirty=False)
    t = cache.get(BASE)
    with pytest.raises(ValueError):  # not from this cache at all
        cache.free(Slot(0x1000, 0x1000, 0), dirty=False)
    with pytest.raises(ValueError):  # right page, forged handle
        cache.free(Slot(t.address, t.page, t.index), dirty=False)
    with pytest.raises(ValueError):  # address does not match index
        cache.free(dataclasses.replace(t, index=t.index + 1), dirty=False)
    cache.free(t, dirty=False)
    assert cache.stats()["slots_used"] == 0


def test_trigger1_garbage_over_a_page_collects_once(cache, host):
    slots = fill(cache, SLOTS_PER_PAGE + 1)
    stats = cache.stats()
    assert stats["pages"] == 2
    for s in slots[:SLOTS_PER_PAGE]:
        cache.free(s, dirty=True)
    assert host.freezes == 0  # exactly SLOTS_PER_PAGE garbage: not yet
    cache.free(slots[-1], dirty=True)
    stats = cache.stats()
    assert host.freezes == 1
    assert stats["collections"] == 1 and stats["freezes"] == 1
    assert stats["garbage"] == 0 and stats["slots_used"] == 0
    # Both pages emptied; they are neighbours, so only one is kept.
    assert stats["pages"] == 1 and len(host.mapped) == 1


def test_trigger2_no_free_slot_collects_once(cache, host):
    slots = fill(cache, SLOTS_PER_PAGE)
    assert cache.stats()["no_free_slot"] == 1  # the very first get had no page
    cache.free(slots[5], dirty=True)
    s = cache.get(BASE)  # page full of used + garbage: collect instead of mapping
    stats = cache.stats()
    assert stats["collections"] == 1 and host.freezes == 1
    assert stats["no_free_slot"] == 2
    assert s.address == slots[5].address
    assert stats["pages"] == 1 and host.map_calls == 1


def test_trigger2_only_for_garbage_in_reach(cache, host):
    far = BASE + 3 * GIB
    g = cache.get(far)
    cache.free(g, dirty=True)
    fill(cache, SLOTS_PER_PAGE)
    s = cache.get(BASE)  # garbage exists, but not in reach: map, do not freeze
    assert host.freezes == 0 and cache.stats()["pages"] == 3
    assert in_reach(s.page, BASE)


def test_collection_keeps_page_for_waiting_get(cache, host):
    # Page A full of used slots, page B all garbage; get() needs a slot: the
    # collection must not unmap B only to map a fresh page straight after.
    a = fill(cache, SLOTS_PER_PAGE)
    b = fill(cache, SLOTS_PER_PAGE)
    for s in b[:SLOTS_PER_PAGE]:
        cache.free(s, dirty=True)
    maps = host.map_calls
    s = cache.get(BASE)
    assert host.map_calls == maps and host.unmap_calls == 0
    assert s.page == b[0].page
    assert cache.stats()["pages"] == 2
    del a


def test_pages_unmapped_except_one_kept(cache, host):
    slots = fill(cache, 4 * SLOTS_PER_PAGE)
    assert cache.stats()["pages"] == 4
    for s in slots[: 3 * SLOTS_PER_PAGE]:
        cache.free(s, dirty=False)
    # Clean frees retire empty pages as they go; the fourth page still has users.
    assert cache.stats()["pages"] == 1
    for s in slots[3 * SLOTS_PER_PAGE :]:
        cache.free(s, dirty=True)
    cache.collect_garbage()
    assert cache.stats()["pages"] == 1 and host.mapped == {slots[-1].page}
    assert cache.stats()["slots_used"] == 0 and cache.stats()["garbage"] == 0


def test_one_page_kept_per_neighbourhood(cache, host):
    near_b = BASE + 3 * GIB
    a = fill(cache, 2 * SLOTS_PER_PAGE)
    b = fill(cache, 2 * SLOTS_PER_PAGE, near_b)
    for s in a + b:
        cache.free(s, dirty=True)
    cache.collect_garbage()
    pages = sorted(host.mapped)
    assert len(pages) == 2
    assert in_reach(pages[0], BASE) and in_reach(pages[1], near_b)
    # Reused without mapping again.
    maps = host.map_calls
    cache.get(BASE), cache.get(near_b)
    assert host.map_calls == maps


def test_parked_thread_is_migrated_before_reuse(cache, host):
    """The seed's scenario: a task preempted inside a boosted slot."""
    slots = fill(cache, SLOTS_PER_PAGE)
    victim = slots[7]
    host.threads[1] = victim.address + 3  # stopped mid-copy, tracer not looking
    host.threads[2] = slots[8].address  # in a slot that stays in use
    host.threads[3] = ORIGINAL_CODE
    cache.free(victim, dirty=True)
    s = cache.get(BASE)  # no free slot: trigger 2
    assert s.address == victim.address
    assert host.threads_in(s.address) == []
    assert host.threads[1] == ORIGINAL_CODE + 1
    assert host.threads[2] == slots[8].address  # live slot: left alone
    assert host.migrated_log == [(1, victim.address + 3)]
    assert cache.stats()["threads_migrated"] == 1


def test_one_freeze_serves_the_batch(cache, host):
    slots = fill(cache, 50)
    for tid, s in enumerate(slots[:20]):
        host.threads[tid] = s.address + tid % SLOT_SIZE
        cache.free(s, dirty=True)
    assert cache.collect_garbage() == 20
    assert host.freezes == 1 and cache.stats()["threads_migrated"] == 20


def test_neighbourhoods(cache, host):
    a = cache.get(BASE)
    b = cache.get(BASE + 3 * GIB)
    assert a.page != b.page
    assert in_reach(a.page, BASE) and not in_reach(a.page, BASE + 3 * GIB)
    assert in_reach(b.page, BASE + 3 * GIB) and not in_reach(b.page, BASE)
    # Another near within reach of the first page shares it.
    c = cache.get(BASE + GIB)
    assert c.page == a.page
    assert cache.stats()["pages"] == 2


def test_thaw_even_if_migration_raises(cache, host):
    slots = fill(cache, 4)
    host.threads.update({1: slots[0].address, 2: slots[1].address})
    cache.free(slots[0], dirty=True)
    cache.free(slots[1], dirty=True)
    host.fail_freeze_after = 1
    with pytest.raises(OSError):
        cache.collect_garbage()
    assert not host.frozen and host.thaws == 1
    # Migration did not finish: the garbage must stay garbage, never reused.
    assert cache.stats()["garbage"] == 2 and cache.stats()["collections"] == 0
    got = fill(cache, SLOTS_PER_PAGE - 4)
    assert {slots[0].address, slots[1].address}.isdisjoint(g.address for g in got)
    host.fail_freeze_after = None
    assert cache.collect_garbage() == 2
    assert host.threads_in(slots[0].address) == host.threads_in(slots[1].address) == []


def test_thaw_even_if_inside_callback_raises(cache, host):
    s = cache.get(BASE)
    cache.free(s, dirty=True)

    def broken(inside):
        host.frozen = True
        host.freezes += 1
        raise RuntimeError("callback blew up")

    host.freeze_and_migrate = broken
    with pytest.raises(RuntimeError):
        cache.collect_garbage()
    assert not host.frozen and cache.stats()["garbage"] == 1


def test_clean_free_retires_an_empty_page_only_if_another_is_near(cache, host):
    a = fill(cache, SLOTS_PER_PAGE)
    b = fill(cache, SLOTS_PER_PAGE)
    for s in a:
        cache.free(s, dirty=True)  # page A: all garbage (not over the threshold)
    for s in b:
        cache.free(s, dirty=False)
    # B emptied by clean frees with A still mapped beside it: B goes at once.
    assert host.mapped == {a[0].page} and host.freezes == 0
    # A full of garbage: the next get collects (trigger 2) and keeps A for itself.
    assert cache.get(BASE).page == a[0].page
    assert host.freezes == 1 and cache.stats()["pages"] == 1
    # The last page of a neighbourhood is kept even when emptied by a clean free.
    cache.free(cache.slot_at(a[0].address), dirty=False)
    assert host.mapped == {a[0].page}


def test_unmap_failure_after_collection_keeps_page_usable(cache, host):
    a = fill(cache, SLOTS_PER_PAGE)
    b = fill(cache, SLOTS_PER_PAGE)
    host.fail_unmap = {a[0].page}
    for s in a:
        cache.free(s, dirty=True)
    with pytest.raises(OSError):
        cache.free(b[0], dirty=True)  # trigger 1
    assert not host.frozen
    st = cache.stats()
    assert st["garbage"] == 0 and st["collections"] == 1 and st["pages"] == 2
    assert cache.get(BASE).page == a[0].page  # the page that failed to unmap is still used


def test_map_failure_and_bad_host_addresses(cache, host):
    host.fail_map = True
    with pytest.raises(SlotMapError):
        cache.get(BASE)
    host.fail_map = False
    host.map_override = lambda near: near + 3 * GIB - (near + 3 * GIB) % PAGE_SIZE
    with pytest.raises(SlotMapError):
        cache.get(BASE)
    assert host.mapped == set()  # the useless page was given back
    host.map_override = lambda near: BASE + 8
    with pytest.raises(SlotMapError):
        cache.get(BASE)
    assert cache.stats()["pages"] == 0


def test_release_all(cache, host):
    fill(cache, SLOTS_PER_PAGE + 3)
    g = cache.get(BASE + 3 * GIB)
    cache.free(g, dirty=True)
    freezes = host.freezes
    cache.release_all()
    assert host.mapped == set() and host.freezes == freezes
    st = cache.stats()
    assert st["pages"] == st["slots_used"] == st["garbage"] == 0
    assert not cache.contains(g.address) and cache.slot_at(g.address) is None
    cache.get(BASE)  # usable again afterwards
    assert cache.stats()["pages"] == 1


def test_contains_is_fast_with_many_pages(cache, host):
    # Many neighbourhoods, one page each; lookups are dict hits, not scans.
    nears = [BASE + i * 3 * GIB for i in range(200)]
    slots = [cache.get(n) for n in nears]
    for s in slots:
        assert cache.contains(s.address) and cache.slot_at(s.address + 5) == s
    assert not cache.contains(nears[-1] + 40 * GIB)


def test_a_cache_of_bigger_slots(host):
    """The trampoline cache (issue 11): 64-byte slots, 64 to a page, the same dirty-free and
    collection rules with its own slots-per-page."""
    cache = SlotCache(host, slot_size=64)
    assert cache.slot_size == 64 and cache.slots_per_page == PAGE_SIZE // 64 == 64
    slots = fill(cache, 65)
    assert cache.stats()["pages"] == 2
    first = slots[0]
    assert [s.address - first.page for s in slots[:64]] == [64 * i for i in range(64)]
    assert cache.slot_at(first.address + 63) == first
    assert cache.slot_at(first.address + 64) == slots[1]
    for s in slots[:64]:
        cache.free(s, dirty=True)
    assert host.freezes == 0  # exactly one page of garbage: not yet
    cache.free(slots[64], dirty=True)
    stats = cache.stats()
    assert host.freezes == 1 and stats["collections"] == 1
    assert stats["garbage"] == 0 and stats["slots_used"] == 0 and stats["pages"] == 1
    with pytest.raises(ValueError):
        SlotCache(host, slot_size=48)
