"""Probe code run in pyprobes' own process: the constant overhead of in-process return probes.

A return probe reports a call's latency without what pyprobes adds (issue 12). What it adds
is the code between the entry routine's TSC read and the return trampoline's: the end of the
entry routine, the trampoline's tail and relocated instructions, the mispredicted ``ret`` into
the return trampoline and its first instructions. That code is the same in every process, so
it is measured here, once, by running the very bytes a tracee runs (x86/record.py's
trampoline, x86/shadow.py's routines) around an empty function (a 5-byte nop, ``ret``) in
this process, with 1 ns per tick and no overhead subtracted: after each call the probe's
latency sum (probe_sum) grows by that call's latency in ticks, exactly. The least of many calls
is the constant (the rest is interrupts, cache misses and frequency changes: what a real call may also meet,
and is not ours to subtract). The engine writes it to the area's HEADER_OVERHEAD.
"""
from __future__ import annotations

import ctypes
import mmap

from ..x86 import Region, find_region, jump_patch
from ..x86.record import routine_trampoline
from ..x86.shadow import (
    ShadowLayout,
    probe_page,
    probe_sum,
    return_trampoline,
    shadow_entry_routine,
    shadow_header,
)

__all__ = ["measure_overhead_ticks"]

_EMPTY_FUNCTION = bytes.fromhex("0f1f440000c3")  # nop dword [rax+rax+0]; ret
# The code page: the function, its trampoline, its hit counter and the routine pointer, then
# the entry routine and the return trampoline.
_TRAMPOLINE, _COUNTER, _POINTER, _ENTRY, _RETURN = 0x40, 0x2000, 0x2008, 0x1000, 0x1800
_CODE_SIZE = 0x3000
_ONE_NS_PER_TICK = 1 << 32


def measure_overhead_ticks(calls: int = 2000) -> int:
    """The least latency, in TSC ticks, that the return-probe code reports for an empty
    function over CALLS calls in this process: the constant to subtract. Raises OSError when
    this process may not map executable memory."""
    layout = ShadowLayout(threads=8, depth=4, probes=1)
    code = mmap.mmap(-1, _CODE_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    area = mmap.mmap(-1, layout.size)
    try:
        function = _place(code, area, layout)
        least, previous = None, 0
        for _ in range(calls):
            function()
            total = probe_sum(area, layout, 0)
            if least is None or total - previous < least:
                least = total - previous
            previous = total
        return least or 0
    finally:
        code.close()
        area.close()


def _place(code: mmap.mmap, area: mmap.mmap, layout: ShadowLayout):
    base = ctypes.addressof(ctypes.c_char.from_buffer(code))
    area_address = ctypes.addressof(ctypes.c_char.from_buffer(area))
    code[0:len(_EMPTY_FUNCTION)] = _EMPTY_FUNCTION
    region = find_region(_EMPTY_FUNCTION, base, len(_EMPTY_FUNCTION), base)
    assert isinstance(region, Region), region
    trampoline = routine_trampoline(region, base + _TRAMPOLINE, base + _COUNTER, base + _POINTER, 0)
    code[_TRAMPOLINE:_TRAMPOLINE + len(trampoline.code)] = trampoline.code
    code[_POINTER:_POINTER + 8] = (base + _ENTRY).to_bytes(8, "little")
    entry = shadow_entry_routine(base + _ENTRY, area_address, layout)
    back = return_trampoline(base + _RETURN, area_address, layout)
    code[_ENTRY:_ENTRY + len(entry)] = entry
    code[_RETURN:_RETURN + len(back)] = back
    header = shadow_header(layout, base + _RETURN, _ONE_NS_PER_TICK, 0)
    area[0:len(header)] = header
    page = probe_page()
    area[layout.probe_offset(0):layout.probe_offset(0) + len(page)] = page
    code[0:region.length] = jump_patch(region, base + _TRAMPOLINE)
    return ctypes.CFUNCTYPE(None)(base)
