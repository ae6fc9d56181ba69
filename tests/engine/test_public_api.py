"""What the command line needs, as a library user gets it: running a spawned program to its
entry with every linked library mapped (run_to_entry), pausing every thread while many probes
go in (pause), and asking how a probe at each function would run (functions_of_*)."""
from __future__ import annotations

import pytest

import pyprobes

ITER = 40


def test_run_to_entry_resolves_libraries_before_the_program_runs(procs, fixture):
    run = procs.spawn(fixture("cli_target"), ITER)
    proc = run.proc
    with pytest.raises(pyprobes.ProbeError):
        proc.probe("libc:getppid")  # at the exec stop only the loader is mapped
    proc.run_to_entry()
    assert run.text == ""  # not a line of its own code has run
    proc.pause()
    ppid = proc.probe("libc:getppid")
    add = proc.probe("cli_add", boost=False)
    assert add.classification in ("boosted", "stepped", "emulated") and add.instruction
    assert run.finish() == 0
    assert run.text.startswith(f"cli_add={ITER} getppid={ITER} ")
    assert (add.hits, ppid.hits) == (ITER, ITER)


def test_run_to_entry_of_a_program_that_exits_first(procs, fixture):
    run = procs.spawn(fixture("cli_target"), ITER)
    run.proc.kill()
    with pytest.raises(pyprobes.PyprobesError):
        run.proc.run_to_entry()


def test_functions_of_binary_and_of_process_agree_on_how_each_would_run(procs, fixture):
    exe = fixture("cli_target")
    in_file = {f.name: f for f in pyprobes.functions_of_binary(str(exe), "cli_*")}
    assert in_file["cli_refused"].probe.startswith("refused:") and "syscall" in in_file["cli_refused"].instruction
    assert in_file["cli_add"].probe in ("boosted", "stepped", "emulated")
    with pytest.raises(pyprobes.SymbolError, match="did you mean"):
        pyprobes.functions_of_binary(str(exe), "cli_ad")
    run = procs.spawn(exe, ITER)
    run.proc.run_to_entry()
    live = {f.name: f for f in pyprobes.functions_of_process(run.pid, "cli_target:cli_*")}
    assert {n: f.probe for n, f in live.items()} == {n: f.probe for n, f in in_file.items()}


def test_functions_say_whether_a_count_probe_would_be_optimized_and_why_not(procs, fixture):
    """FunctionPlan.not_optimized: the optimizer's own checks, file and process alike, and a count
    probe placed there gets the mode they foresee (tests/fixtures/opt_count.c)."""
    exe = fixture("opt_count")
    in_file = {f.name: f for f in pyprobes.functions_of_binary(str(exe), "opt_*")}
    assert in_file["opt_lea"].optimized and in_file["opt_lea"].not_optimized == ""
    assert in_file["opt_push"].optimized
    jmp, copy = in_file["opt_jmp"], in_file["opt_copy"]
    assert not jmp.optimized and jmp.probe == "emulated" and "'jmp" in jmp.not_optimized
    # opt_pcopy jumps to opt_copy+3: only the sweep of the whole file sees it
    assert not copy.optimized and "opt_count reaches" in copy.not_optimized
    assert "inside the bytes" in copy.not_optimized

    run = procs.spawn(exe, 1000, 1)
    run.proc.run_to_entry()
    live = {f.name: f for f in pyprobes.functions_of_process(run.pid, "opt_count:opt_*")}
    assert {n: f.optimized for n, f in live.items()} == {n: f.optimized for n, f in in_file.items()}
    probes = {name: run.proc.probe(name, action="count") for name in ("opt_lea", "opt_jmp", "opt_copy")}
    assert run.finish() == 0
    assert {name: p.mode == "optimized" for name, p in probes.items()} == {
        name: in_file[name].optimized for name in probes}
    assert probes["opt_lea"].hits == 1000
