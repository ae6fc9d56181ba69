"""In-process return probes (x86/shadow.py, shadow_code.py): the entry routine and the return
trampoline run here, in the test process, no ptrace. Small functions assembled with ``as`` are
copied into an rwx page, jump-patched onto routine-calling trampolines (record.py) that call the entry
routine, and called through ctypes; the area is an mmap of this process."""
from __future__ import annotations

import ctypes
import mmap
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from iced_x86 import Code, Decoder, Mnemonic

from pyprobes.x86 import Region, find_region, jump_patch
from pyprobes.x86.record import RECORD, RECORD_SIZE, RING_HEADER_SIZE, record_routine, routine_trampoline
from pyprobes.x86.shadow import (
    BUCKETS,
    SHADOW_CODE_BOUND,
    FRAME,
    RECORD_ENTRY,
    RECORD_RETURN,
    RETURN_RECORD_FLAG,
    THREAD_HEADER,
    Frame,
    ShadowLayout,
    bucket_bounds,
    find_thread,
    latency_bucket,
    latency_ns,
    ns_per_tick_fixed,
    probe_page,
    probe_stats,
    return_trampoline,
    shadow_entry_routine,
    shadow_header,
    thread_frames,
    thread_hash,
)

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15")
KNOWN = {name: 0x1122_3344_5566_7700 + i for i, name in enumerate(GPRS)}
KNOWN_FLAGS = 0x8D7  # CF PF AF ZF SF OF and the reserved bit 1
OUT_FLAGS, OUT_RSP_AFTER, OUT_RSP_BEFORE, OUT_XMM = 15, 16, 17, 18 * 8
OUT_SIZE = OUT_XMM + 16 * 16


def _harness_asm() -> str:
    """harness(out): loads KNOWN into every GPR, i * 0x0101.. into both halves of xmm i, the
    flags KNOWN_FLAGS, calls target, and stores what it sees after: GPRS, flags, rsp, xmm."""
    lines = ["harness:", *(f"push {r}" for r in ("rbx", "rbp", "r12", "r13", "r14", "r15")),
             "push rdi", f"mov [rdi+{8 * OUT_RSP_BEFORE}], rsp"]
    for i in range(16):
        lines += [f"mov rax, {0x0101_0101_0101_0101 * (i + 1):#x}", f"movq xmm{i}, rax",
                  f"punpcklqdq xmm{i}, xmm{i}"]
    lines += [f"push {KNOWN_FLAGS:#x}", "popfq"]
    lines += [f"mov {name}, {value:#x}" for name, value in KNOWN.items()]
    lines += ["call target", "pushfq", "push rax", "mov rax, [rsp+16]"]
    lines += [f"mov [rax+{8 * i}], {name}" for i, name in enumerate(GPRS) if name != "rax"]
    lines += ["lea rbx, [rsp+16]", f"mov [rax+{8 * OUT_RSP_AFTER}], rbx", "pop qword ptr [rax]",
              f"pop qword ptr [rax+{8 * OUT_FLAGS}]"]
    lines += [f"movdqu [rax+{OUT_XMM + 16 * i}], xmm{i}" for i in range(16)]
    lines += ["pop rdi", *(f"pop {r}" for r in ("r15", "r14", "r13", "r12", "rbp", "rbx")), "ret"]
    return "\n".join(lines)


FUNCTIONS = """
.intel_syntax noprefix
.text
.macro fn name
.p2align 6
.type \\name, @function
\\name:
.endm
fn value                 # rax = 3 * rdi, xmm0 = (double) rdi
  nop dword ptr [rax+rax*1+0]
  lea rax, [rdi+rdi*2]
  cvtsi2sd xmm0, rdi
  ret
.size value, .-value
fn recurse               # rax = rdi, by rdi nested calls
  nop dword ptr [rax+rax*1+0]
  test rdi, rdi
  jz 1f
  dec rdi
  call recurse
  inc rax
  ret
1: xor eax, eax
  ret
.size recurse, .-recurse
fn outer                 # a tail call: value(rdi + 1)
  nop dword ptr [rax+rax*1+0]
  add rdi, 1
  jmp value
.size outer, .-outer
fn empty
  nop dword ptr [rax+rax*1+0]
  ret
.size empty, .-empty
fn target                # sets rax, rdx, xmm0 and the flags (CF, SF), touches nothing else
  nop dword ptr [rax+rax*1+0]
  mov rax, 0x1111222233334444
  mov rdx, 0x5555666677778888
  movq xmm0, rdx
  cmp rax, rdx
  ret
.size target, .-target
fn overflow              # returns with OF, SF, AF and PF set (0x7fff...f + 1)
  nop dword ptr [rax+rax*1+0]
  mov rax, 0x7fffffffffffffff
  add rax, 1
  ret
.size overflow, .-overflow
fn overflow_flags        # the flags overflow returns with
  call overflow
  pushfq
  pop rax
  ret
.size overflow_flags, .-overflow_flags
fn key                   # %fs:0, the thread's key
  mov rax, qword ptr fs:[0]
  ret
.size key, .-key
fn harness
""" + _harness_asm() + """
.size harness, .-harness
"""
PROBED = ("value", "recurse", "outer", "empty", "target", "overflow")  # shadow probe id = index


@pytest.fixture(scope="module")
def functions(tmp_path_factory) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The assembled functions: code from offset 0, and name -> (offset, size)."""
    work = tmp_path_factory.mktemp("shadow")
    (work / "f.s").write_text(FUNCTIONS)
    subprocess.run(["as", "--64", "-o", str(work / "f.o"), str(work / "f.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(work / "f.o"), str(work / "f.bin")],
                   check=True)
    symbols = {}
    for line in subprocess.run(["nm", "--print-size", str(work / "f.o")], check=True,
                               capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 4:
            symbols[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return Path(work / "f.bin").read_bytes(), symbols


def _u64(view, offset: int) -> int:
    return int.from_bytes(view[offset:offset + 8], "little")


class Live:
    """Functions, their routine-calling trampolines, the routines and the area, in this process.

    code page: 0x0000 functions, 0x1000 trampolines (64 bytes each), 0x2000 hit counters and at
    0x2ff8 the pointer to the entry routine, 0x3000 entry routine, 0x3400 return trampoline,
    0x3800 the ring's record routine."""

    CAPACITY = 64

    def __init__(self, functions, layout: ShadowLayout = ShadowLayout(threads=8, depth=16, probes=8),
                 flags: int = 0, ring: bool = False, overhead: int = 0) -> None:
        code, self.symbols = functions
        self.layout = layout
        self.code = mmap.mmap(-1, 0x4000, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.code))
        self.area = mmap.mmap(-1, layout.size)
        self.area_address = ctypes.addressof(ctypes.c_char.from_buffer(self.area))
        self.ring = mmap.mmap(-1, RING_HEADER_SIZE + self.CAPACITY * RECORD_SIZE)
        ring_address = ctypes.addressof(ctypes.c_char.from_buffer(self.ring))
        self.code[0:len(code)] = code
        entry, trampoline, recorder = self.base + 0x3000, self.base + 0x3400, self.base + 0x3800
        self.code[0x3000:0x3400] = shadow_entry_routine(entry, self.area_address, layout).ljust(0x400, b"\xcc")
        self.code[0x3400:0x3800] = return_trampoline(trampoline, self.area_address, layout).ljust(0x400, b"\xcc")
        self.code[0x3800:0x3C00] = record_routine(recorder, ring_address, self.CAPACITY).ljust(0x400, b"\xcc")
        self.code[0x2FF8:0x3000] = entry.to_bytes(8, "little")
        self.trampoline = trampoline
        self.area[0:80] = shadow_header(layout, trampoline, 1 << 32, overhead, recorder if ring else 0)
        for probe_id, name in enumerate(PROBED):
            at = layout.probe_offset(probe_id)
            self.area[at:at + 64] = probe_page(flags, 100 + probe_id, 200 + probe_id)
            self._patch(name, probe_id)

    def _patch(self, name: str, probe_id: int) -> None:
        offset, size = self.symbols[name]
        address = self.base + offset
        region = find_region(bytes(self.code[offset:offset + size]), address, size, address)
        assert isinstance(region, Region), region
        slot = self.base + 0x1000 + 64 * probe_id
        t = routine_trampoline(region, slot, self.base + 0x2000 + 8 * probe_id, self.base + 0x2FF8, probe_id)
        self.code[slot - self.base:slot - self.base + len(t.code)] = t.code
        self.code[offset:offset + region.length] = jump_patch(region, slot)

    def function(self, name: str, restype=ctypes.c_uint64, argtypes=(ctypes.c_uint64,)):
        return ctypes.CFUNCTYPE(restype, *argtypes)(self.base + self.symbols[name][0])

    def hits(self, name: str) -> int:
        return _u64(self.code, 0x2000 + 8 * PROBED.index(name))

    def stats(self, name: str):
        return probe_stats(self.area, self.layout, PROBED.index(name))

    def key(self) -> int:
        return self.function("key", argtypes=())()

    def frames(self) -> list[Frame]:
        return thread_frames(self.area, self.layout)[self.key()]

    def records(self) -> list[tuple]:
        head = _u64(self.ring, 64)
        return [RECORD.unpack_from(self.ring, RING_HEADER_SIZE + i * RECORD_SIZE) for i in range(head)]


def test_bucket_reference_is_monotonic_and_inverse():
    values = list(range(0, 5000)) + [(1 << b) + d for b in range(12, 64) for d in (-1, 0, 1)]
    values += [(1 << 64) - 1]
    previous = 0
    for ns in sorted(values):
        bucket = latency_bucket(ns)
        low, high = bucket_bounds(bucket)
        assert low <= ns < high and previous <= bucket < BUCKETS
        previous = bucket
    for index in range(BUCKETS):
        low, high = bucket_bounds(index)
        assert latency_bucket(low) == index == latency_bucket(high - 1)
        assert index == 0 or bucket_bounds(index - 1)[1] == low
        assert high - low <= max(1, low // 8)
    assert latency_bucket((1 << 64) - 1) == BUCKETS - 1


def test_latency_reference_clamps_and_scales():
    assert latency_ns(100, 30, 1 << 32) == 70
    assert latency_ns(20, 30, 1 << 32) == 0
    assert latency_ns((1 << 64) - 5, 0, 1 << 32) == 0       # the return's TSC behind the entry's
    assert latency_ns(1000, 0, 3 << 31) == 1500             # 1.5 ns per tick


@pytest.mark.parametrize("layout", [ShadowLayout(), ShadowLayout(threads=1, depth=1, probes=1),
                                    ShadowLayout(threads=4096, depth=1024, probes=512)])
def test_routines_fit_the_code_page_and_end_where_they_should(layout):
    entry = shadow_entry_routine(0x7F00_0000_1000, 0x7F10_0000_0000, layout)
    back = return_trampoline(0x7F00_0000_1400, 0x7F10_0000_0000, layout)
    assert len(entry) + len(back) <= SHADOW_CODE_BOUND
    entry_insns = list(Decoder(64, entry, ip=0x7F00_0000_1000))
    back_insns = list(Decoder(64, back, ip=0x7F00_0000_1400))
    assert all(i.code != Code.INVALID for i in entry_insns + back_insns)
    assert [i.mnemonic for i in back_insns[:4]] == [Mnemonic.LEA, Mnemonic.PUSH, Mnemonic.PUSH, Mnemonic.RDTSC]
    assert sum(i.mnemonic == Mnemonic.UD2 for i in back_insns) == 1
    rdtsc = [n for n, i in enumerate(entry_insns) if i.mnemonic == Mnemonic.RDTSC]
    call = [n for n, i in enumerate(entry_insns) if i.mnemonic == Mnemonic.CALL]
    assert len(rdtsc) == 1 and call[0] < rdtsc[0]  # the entry record before the timestamp


def test_shared_routines_load_no_flags_image():
    """Migration single-steps a thread through the routines a trampoline calls (or a return
    lands on): a stepped popf would load the step's TF for the program's (engine/optimizer.py
    migrate), so none of them may hold a pushf or popf."""
    from pyprobes.x86.record import record_action_routine

    area, code = 0x7F10_0000_0000, 0x7F00_0000_1000
    for routine in (shadow_entry_routine(code, area, ShadowLayout()),
                    return_trampoline(code, area, ShadowLayout()),
                    record_routine(code, area, 1024), record_action_routine(code, area, 1024)):
        mnemonics = {i.mnemonic for i in Decoder(64, routine, ip=code)}
        assert not mnemonics & {Mnemonic.PUSHF, Mnemonic.PUSHFQ, Mnemonic.POPF, Mnemonic.POPFQ}


def test_calls_return_exact_values_and_count_every_return(functions):
    live = Live(functions)
    value = live.function("value")
    as_double = live.function("value", restype=ctypes.c_double)
    for n in range(1000):
        assert value(n) == 3 * n
    assert as_double(7) == 7.0
    stats = live.stats("value")
    assert stats.returns == 1001 == live.hits("value") and sum(stats.buckets) == 1001
    reserved = live.layout.probe_offset(PROBED.index("value"))  # version 1's returns word
    assert live.area[reserved:reserved + 8] == bytes(8)
    assert (stats.missed, stats.dropped) == (0, 0)
    assert stats.max_ns <= stats.sum_ns and stats.sum_ns > 0
    assert live.frames() == []
    key = live.key()
    assert find_thread(live.area, live.layout, key) is not None
    assert find_thread(live.area, live.layout, key ^ 0x10) is None


def test_the_histogram_agrees_with_the_reference(functions):
    """With ns = ticks (32.32 of 1.0), max and a lone bucket agree with latency_bucket."""
    live = Live(functions)
    live.function("empty")(0)
    stats = live.stats("empty")
    (bucket,) = [i for i, n in enumerate(stats.buckets) if n]
    assert stats.returns == 1 and stats.sum_ns == stats.max_ns
    assert bucket == latency_bucket(stats.max_ns)


def test_recursion_past_the_depth_counts_missed_and_returns_right(functions):
    live = Live(functions, ShadowLayout(threads=8, depth=4, probes=8))
    recurse = live.function("recurse")
    for _ in range(5):
        assert recurse(9) == 9  # 10 calls: 4 followed, 6 missed
    stats = live.stats("recurse")
    assert (stats.returns, stats.missed, stats.dropped) == (20, 30, 0)
    assert live.hits("recurse") == 50 and live.frames() == []


def test_a_tail_call_chains_both_frames_on_one_slot(functions):
    live = Live(functions)
    outer = live.function("outer")
    for n in range(100):
        assert outer(n) == 3 * (n + 1)
    assert live.stats("outer").returns == 100 == live.stats("value").returns
    assert live.stats("outer").dropped == 0 == live.stats("value").dropped
    assert live.frames() == []


def test_abandoned_frames_are_dropped_and_counted_on_their_probe(functions):
    live = Live(functions)
    value = live.function("value")
    value(1)  # claims the thread's entry
    key = live.key()
    at = live.layout.thread_offset(find_thread(live.area, live.layout, key))
    # as longjmp leaves them: two frames of probe "target" whose slots are below any live stack
    for i, slot in enumerate((0x2000, 0x1000)):
        frame = at + THREAD_HEADER + i * 80
        live.area[frame:frame + 80] = FRAME.pack(0xDEAD, slot, 1, PROBED.index("target"),
                                                                  *range(6))
    live.area[at + 8:at + 16] = (2).to_bytes(8, "little")
    assert value(2) == 6
    assert live.stats("target").dropped == 2 and live.stats("target").returns == 0
    assert live.stats("value").returns == 2 and live.stats("value").dropped == 0
    assert live.frames() == []


def test_records_at_entry_and_return_carry_args_result_and_entry_time(functions):
    live = Live(functions, flags=RECORD_ENTRY | RECORD_RETURN, ring=True)
    assert live.function("value", argtypes=[ctypes.c_uint64] * 4)(5, 6, 7, 8) == 15
    (entry, back) = live.records()
    key = live.key()
    _, tsc_in, key_in, id_in, *args_in = entry
    _, tsc_out, key_out, id_out, rax, entry_tsc, *args_out = back
    assert (key_in, key_out) == (key, key)
    assert id_in == 100 and id_out == 200 | RETURN_RECORD_FLAG
    assert args_in[:4] == [5, 6, 7, 8] and args_out == [5, 6, 7, 8]
    assert rax == 15 and tsc_in <= entry_tsc <= tsc_out


@pytest.mark.parametrize("flags,ring", [(0, False), (RECORD_ENTRY | RECORD_RETURN, True)])
def test_registers_at_return_are_the_functions(functions, flags, ring):
    """Every GPR, xmm0-15, rsp and the flags after the probed call are what the unprobed
    function leaves: rax, rdx, xmm0 and the flags its own, the rest the caller's."""
    plain_code, _ = functions
    seen = []
    for probed in (False, True):
        live = Live(functions, flags=flags, ring=ring)
        if not probed:  # the original bytes back over the patch
            offset, size = live.symbols["target"]
            live.code[offset:offset + size] = plain_code[offset:offset + size]
        out = ctypes.create_string_buffer(OUT_SIZE)
        live.function("harness", restype=None, argtypes=(ctypes.c_void_p,))(ctypes.addressof(out))
        seen.append(bytes(out))
        if probed:
            assert live.stats("target").returns == 1 and live.frames() == []
            assert len(live.records()) == (2 if ring else 0)
    plain, probed = seen
    assert probed == plain
    words = struct.unpack_from("<18Q", probed)
    assert words[0] == 0x1111222233334444 and words[3] == 0x5555666677778888
    for i, name in enumerate(GPRS):
        if name not in ("rax", "rdx"):
            assert words[i] == KNOWN[name], name
    assert words[OUT_FLAGS] & 0x81 == 0x81 and words[OUT_RSP_AFTER] == words[OUT_RSP_BEFORE]
    assert probed[OUT_XMM:OUT_XMM + 8] == (0x5555666677778888).to_bytes(8, "little")
    for i in range(1, 16):
        assert probed[OUT_XMM + 16 * i:OUT_XMM + 16 * i + 16] == bytes([i + 1]) * 16


def test_threads_count_exactly_each_in_its_own_entry(functions):
    live = Live(functions)
    value, recurse = live.function("value"), live.function("recurse")
    calls, threads = 100_000, 4
    start = threading.Barrier(threads)
    keys, wrong = [], []

    def work() -> None:
        start.wait()
        keys.append(live.key())
        for n in range(calls):
            if value(n) != 3 * n or (n % 1000 == 0 and recurse(3) != 3):
                wrong.append(n)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert wrong == []
    stats = live.stats("value")
    assert stats.returns == threads * calls == sum(stats.buckets) == live.hits("value")
    assert live.stats("recurse").returns == threads * 100 * 4
    frames = thread_frames(live.area, live.layout)
    assert len(set(keys)) == threads and set(keys) <= set(frames)
    assert all(stack == [] for stack in frames.values())
    assert {thread_hash(k, live.layout.threads) for k in keys} <= set(range(live.layout.threads))
    # each thread summed its own latencies in its entry, and the probe's sum is theirs
    value_id = PROBED.index("value")
    sums = [_u64(live.area, live.layout.thread_offset(find_thread(live.area, live.layout, k))
                 + live.layout.sums_offset + 8 * value_id) for k in keys]
    assert all(sums) and stats.sum_ns == sum(sums) >= stats.max_ns


def test_a_full_thread_table_counts_missed(functions):
    live = Live(functions, ShadowLayout(threads=1, depth=4, probes=8))
    value = live.function("value")
    other = threading.Thread(target=value, args=(1,))
    other.start()
    other.join()  # its thread (a TCB other than this live thread's) took the only entry
    assert live.key() not in thread_frames(live.area, live.layout)
    assert value(4) == 12
    stats = live.stats("value")
    assert (stats.returns, stats.missed) == (1, 1)


class Snippets:
    """The return trampoline's latency and bucket code as functions of their own, run here."""

    def __init__(self) -> None:
        from iced_x86 import Instruction, Register

        from pyprobes.x86.record import _assemble_list
        from pyprobes.x86.shadow_code import _bucket, _latency

        def mov(dst, src):
            return Instruction.create_reg_reg(Code.MOV_R64_RM64, dst, src)

        self.code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.code))
        R = Register
        bucket = [mov(R.R9, R.RDI), *_bucket(), Instruction.create(Code.RETNQ)]
        latency = [Instruction.create_reg(Code.PUSH_R64, R.RBX), mov(R.RBX, R.RDX), mov(R.R8, R.RDI),
                   mov(R.RAX, R.RSI), *_latency(), mov(R.RAX, R.R9), Instruction.create_reg(Code.POP_R64, R.RBX),
                   Instruction.create(Code.RETNQ)]
        self.code[0:256] = _assemble_list(bucket, base).ljust(256, b"\xcc")
        self.code[256:512] = _assemble_list(latency, base + 256).ljust(256, b"\xcc")
        u64 = ctypes.c_uint64
        self.bucket = ctypes.CFUNCTYPE(u64, u64)(base)
        self.latency = ctypes.CFUNCTYPE(u64, u64, u64, ctypes.c_void_p)(base + 256)


def test_the_bucket_code_agrees_with_the_reference_for_every_kind_of_value():
    import random
    snippets = Snippets()
    rng = random.Random(12)
    values = list(range(0, 4096)) + [(1 << 64) - 1, 1 << 63]
    values += [max(0, (1 << b) + d) for b in range(64) for d in (-2, -1, 0, 1)]
    values += [rng.getrandbits(rng.randint(1, 64)) for _ in range(20_000)]
    wrong = [(v, snippets.bucket(v), latency_bucket(v)) for v in values
             if snippets.bucket(v) != latency_bucket(v)]
    assert wrong == []


def test_the_latency_code_agrees_with_the_reference():
    import random
    snippets = Snippets()
    rng = random.Random(7)
    header = ctypes.create_string_buffer(4096)
    wrong = []
    for _ in range(2000):
        entry = rng.getrandbits(64)
        ticks = rng.choice([rng.getrandbits(rng.randint(1, 40)), (1 << 64) - rng.getrandbits(8)])
        overhead = rng.getrandbits(rng.randint(1, 12))
        fixed = rng.choice([1 << 32, 0, rng.getrandbits(34), ns_per_tick_fixed(1 / 2.7)])
        header[0:80] = shadow_header(ShadowLayout(), 0, fixed, overhead)
        got = snippets.latency((entry + ticks) & ((1 << 64) - 1), entry, ctypes.addressof(header))
        if got != latency_ns(ticks, overhead, fixed):
            wrong.append((ticks, overhead, fixed, got))
    assert wrong == []


def test_the_overhead_is_subtracted_and_a_latency_never_goes_below_zero(functions):
    live = Live(functions, overhead=1 << 40)
    empty = live.function("empty")
    for _ in range(100):
        empty(0)
    stats = live.stats("empty")
    assert (stats.returns, stats.sum_ns, stats.max_ns, stats.buckets[0]) == (100, 0, 0, 100)


def test_the_overflow_flag_at_return_is_the_functions(functions):
    """OF is kept apart from the other arithmetic flags (seto/lahf): a return with OF set."""
    live = Live(functions)
    arithmetic = 0x8D5  # CF PF AF ZF SF OF
    assert live.function("overflow_flags", argtypes=())() & arithmetic == 0x894  # OF SF AF PF
    assert live.stats("overflow").returns == 1 and live.frames() == []
