"""The seed's scenario, made deterministic: a thread stopped inside a boosted slot while its
probe is removed. The slot becomes garbage; it is not handed out again until a collection
has migrated the thread out of it (invariant 1); the thread then goes on correctly.

A pre-handler on the boosted probe holds the hitting thread (Tracee.hold): the hit path then
sets its RIP to the slot and "resumes" it, which a held thread ignores, so it stays stopped
exactly where a preempted thread would be: at the slot's first byte, or (after one manual
step) on the slot's jmp back.
"""
from __future__ import annotations

import os
import signal

import pytest

from .conftest import hold_in_boosted_slot, maps, spec_of


@pytest.mark.parametrize("where", ["slot-start", "on-jmp-back"])
def test_thread_held_in_boosted_slot_is_migrated_before_reuse(procs, fixture, where):
    run = procs.spawn(fixture("eng_work"), "lea,many", 4, 0)
    proc, tracee = run.proc, run.proc.tracee
    p, held = hold_in_boosted_slot(run, "w_lea")
    tid = held["tid"]
    slot = p.point.slot
    assert tracee.get_rip(tid) == slot.address
    if where == "on-jmp-back":
        tracee.step(tid)  # the copied lea runs; the thread now sits on the slot's jmp back
        rip = tracee.get_rip(tid)
        assert slot.address < rip < slot.address + 32
        assert tracee.get_regs(tid).rax == 3 * held["rdi"]

    before = dict(proc.slots.stats())
    p.remove()
    # Threads that hit the probe just before it was boosted may still be single-stepping
    # the copy: the slot is given back when the last of them reports its step.
    for _ in range(20):
        if p.point.slot is None:
            break
        proc.run(timeout=0.05)
    assert p.point.slot is None and p.point.steppers == 0
    stats = proc.slots.stats()
    assert stats["garbage"] == before["garbage"] + 1  # dirty: it ran boosted
    assert stats["threads_migrated"] == before["threads_migrated"]
    assert tracee.get_rip(tid) in range(slot.address, slot.address + 32)

    # The garbage slot is not handed out while the thread may be in it.
    q = proc.probe("w_many")
    assert q.point.slot.address != slot.address
    proc.run(timeout=0.2)  # the others run on through the new probe meanwhile
    assert tracee.get_rip(tid) in range(slot.address, slot.address + 32)

    reclaimed = proc.slots.collect_garbage()
    assert reclaimed == 1
    stats = proc.slots.stats()
    assert stats["garbage"] == 0
    assert stats["threads_migrated"] == before["threads_migrated"] + 1
    assert proc.engine.stats["threads_migrated"] >= 1
    # Out of the slot, in original code just after the lea, which ran exactly once.
    regs = tracee.get_regs(tid)
    assert regs.rip == p.address + 4
    assert regs.rax == 3 * held["rdi"]

    # Now the slot is reused: new code is written where the held thread used to be.
    r = proc.probe("w_many+0x3")
    assert r.point.slot.address == slot.address
    proc.run(timeout=0.2)
    tracee.release(tid)
    proc.run(timeout=0.3)
    assert q.hits > 0 and r.hits > 0
    os.kill(proc.pid, signal.SIGUSR1)
    assert run.finish() == 0, run.text
    res = run.results
    assert res[("func", "lea")]["bad"] == 0
    assert res[("func", "many")]["bad"] == 0
    assert res[()]["sigtrap"] == 0
    assert r.hits <= res[("func", "many")]["calls"]


def test_detach_migrates_a_held_thread_and_unmaps_slots(procs, fixture):
    """Detach with a thread stopped in a boosted slot: it is stepped out, every slot page is
    unmapped, and the program finishes correctly untraced."""
    run = procs.spawn(fixture("eng_work"), "lea,push", 4, 0)
    proc = run.proc
    p, held = hold_in_boosted_slot(run, "w_lea")
    page = p.point.slot.page
    assert any(start <= page < end for start, end, _, _ in maps(proc.pid))
    pid = proc.pid
    proc.detach()
    assert not any(start <= page < end for start, end, _, _ in maps(pid))
    os.kill(pid, signal.SIGUSR1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, run.text)
    res = run.results
    assert res[("func", "lea")]["bad"] == 0 and res[()]["sigtrap"] == 0


def test_kill_with_a_thread_held_in_a_slot(procs, fixture):
    """Killing the process while a thread is held: the held thread's exit stop must be
    resumed too, or the process never finishes dying (Tracee.kill used to hang here)."""
    run = procs.spawn(fixture("eng_work"), "lea", 4, 0)
    hold_in_boosted_slot(run, "w_lea")
    assert run.proc.kill() == -signal.SIGKILL
    assert not run.proc.alive


def test_freeze_and_thaw_while_threads_single_step_slots(procs, fixture):
    """A freeze that interrupts a thread resumed with PTRACE_SINGLESTEP before its step ran:
    thaw must resume it stepping. (It used PTRACE_CONT, and the thread ran on past the copy
    into the rest of the slot page and died of SIGSEGV.) The pre-handler stops run() right
    after it, so the freeze comes while the hitting thread's step is still in flight."""
    run = procs.spawn(fixture("eng_work"), "lock", 8, 3_000)
    proc = run.proc

    def pre(tid, regs):
        proc.stop()

    p = proc.probe("w_lock", pre=pre)
    freezes = 0
    while proc.alive and freezes < 400:
        proc.run(timeout=1.0)
        if not proc.alive:
            break
        proc.tracee.freeze()
        proc.tracee.thaw()
        freezes += 1
    assert run.finish() == 0, run.text
    res = run.results
    assert res[("func", "lock")] == {"calls": 24_000, "bad": 0}
    assert res[()]["lock_total"] == 24_000 and res[()]["sigtrap"] == 0
    assert p.hits == 24_000 and p.mode == "stepped"
    assert freezes == 400


@pytest.mark.parametrize("how", ["collect", "detach"])
@pytest.mark.parametrize("insn", ["push", "ret"])
def test_thread_held_in_a_boosted_push_or_ret_slot(procs, fixture, insn, how):
    """push reg and ret are boosted, not emulated: a thread held at the start of their slot is
    stepped out by a collection (or a detach) like any other. The push stores rbx at RSP-8 and
    the thread goes on right after it; the ret pops its return address and the thread is at
    the caller, outside every slot, with nothing left to fix."""
    exe = fixture("eng_work")
    run = procs.spawn(exe, "push", 4, 0)
    proc, tracee = run.proc, run.proc.tracee
    spec = "w_push" if insn == "push" else spec_of(exe, "w_push", "w_push_ret")
    p, held = hold_in_boosted_slot(run, spec)
    tid = held["tid"]
    slot = p.point.slot
    regs = tracee.get_regs(tid)
    assert regs.rip == slot.address
    rsp, rbx = regs.rsp, regs.rbx
    top = tracee.memory.read_u64(rsp)
    if how == "detach":
        pid = proc.pid
        proc.detach()
        os.kill(pid, signal.SIGUSR1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, run.text)
        res = run.results
        assert res[("func", "push")]["bad"] == 0 and res[()]["sigtrap"] == 0
        return
    p.remove()
    for _ in range(20):
        if p.point.slot is None:
            break
        proc.run(timeout=0.05)
    assert p.point.slot is None
    assert proc.slots.collect_garbage() == 1
    regs = tracee.get_regs(tid)
    if insn == "push":
        assert regs.rip == p.address + 1
        assert regs.rsp == rsp - 8 and tracee.memory.read_u64(regs.rsp) == rbx
    else:
        assert regs.rip == top and not proc.slots.contains(regs.rip)
        assert regs.rsp == rsp + 8
    tracee.release(tid)
    proc.run(timeout=0.3)
    os.kill(proc.pid, signal.SIGUSR1)
    assert run.finish() == 0, run.text
    res = run.results
    assert res[("func", "push")]["bad"] == 0 and res[()]["sigtrap"] == 0
