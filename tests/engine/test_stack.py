"""engine/stack.py: stacks of an -O2 -fomit-frame-pointer program, unwound by CFI, against gdb."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import pyprobes
from pyprobes.symbols.cfi import cfi_of

CHAIN = ["stk_c", "stk_b", "stk_a", "main"]


@pytest.fixture(scope="module")
def chain(build):
    return build("stk_chain.c", "-O2", "-fomit-frame-pointer", output="stk_chain_o2")


def _stacks(argv: list[str], spec: str, boost: bool = True) -> list[list[pyprobes.Frame]]:
    proc = pyprobes.spawn(argv)
    stacks = []
    try:
        proc.run_to_entry()  # libc is loaded
        proc.probe(spec, pre=lambda tid, regs: stacks.append(proc.stack(tid, regs)), boost=boost)
        proc.run()
    finally:
        if proc.alive:
            proc.kill()
    return stacks


def _gdb_bt(exe: str, function: str = "stk_c", *args: str) -> list[tuple[str, int | None]]:
    """(function, pc or None for frame 0) of each frame gdb's `bt` shows at the first FUNCTION."""
    out = subprocess.run(["gdb", "-batch", "-nx", "-ex", "set debuginfod enabled off",
                          "-ex", "set backtrace past-main on", "-ex", "handle SIGUSR1 nostop noprint pass",
                          "-ex", f"break {function}", "-ex", "run", "-ex", "bt", "--args", exe, *args],
                         capture_output=True, text=True, timeout=120).stdout
    frames = []
    for line in out.splitlines():
        m = re.match(r"#\d+\s+(?:(0x[0-9a-f]+) in )?(<signal handler called>|\S+)(?: \(|$)", line)
        if m:
            frames.append((m.group(2), int(m.group(1), 16) if m.group(1) else None))
    return frames


def test_chain_without_frame_pointers(chain):
    stacks = _stacks([str(chain), "3"], "stk_c")
    assert len(stacks) == 3
    for frames in stacks:
        assert [f.function for f in frames[:4]] == CHAIN
        assert frames[0].name == f"{chain.name}:stk_c"
        assert re.fullmatch(rf"{chain.name}:stk_b\+0x[0-9a-f]+", frames[1].name)
        assert frames[-1].function == "_start"


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_matches_gdb_bt(chain):
    ours = _stacks([str(chain), "1"], "stk_c")[0]
    theirs = _gdb_bt(str(chain), "stk_c", "1")
    assert len(theirs) >= 5, theirs
    assert len(ours) == len(theirs), ([f.name for f in ours], theirs)
    # Through main the names are the binary's own; past it gdb may name libc's frames from
    # its debug info (__libc_start_main_impl for our __libc_start_main), so there the pcs'
    # page offsets (the same under any load address) must agree.
    for frame, (name, pc) in zip(ours, theirs):
        if frame.function in CHAIN or name in CHAIN or name == "_start":
            assert frame.function == name
        if pc is not None:
            assert frame.pc & 0xFFF == pc & 0xFFF, (frame.name, name, hex(pc))


def test_chain_from_debug_frame(build):
    exe = build("stk_chain.c", "-O2", "-fomit-frame-pointer", "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables", output="stk_chain_debug_frame")
    (frames,) = _stacks([str(exe), "1"], "stk_c")
    assert [f.function for f in frames[:4]] == CHAIN and frames[-1].function == "_start"


def test_stack_from_a_stepped_probe(chain):
    # boost=False: the same registers whichever way the probe runs the displaced instruction
    stacks = _stacks([str(chain), "2"], "stk_b", boost=False)
    assert [[f.function for f in s[:3]] for s in stacks] == [CHAIN[1:]] * 2


PYTHON = "/usr/bin/python3.11"


@pytest.mark.skipif(not __import__("os").path.exists(PYTHON), reason="no Debian python3.11")
def test_through_stripped_python(tmp_path):
    script = tmp_path / "calls.py"
    script.write_text("import os\ndef leaf():\n    return os.getpid()\nfor _ in range(3):\n    leaf()\n")
    stacks = _stacks([PYTHON, str(script)], "libc:getpid")
    assert len(stacks) >= 3
    for frames in stacks[-3:]:  # the interpreter's own startup may call getpid too
        names = [f.function for f in frames]
        assert names[0] == "getpid"
        for exported in ("PyObject_Vectorcall", "_PyEval_EvalFrameDefault", "Py_BytesMain"):
            assert exported in names, [f.name for f in frames]
        assert names.index("_PyEval_EvalFrameDefault") < names.index("Py_BytesMain")
        assert frames[-1].function == "_start"


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_through_a_signal_frame(build):
    # libc's __restore_rt has a signal frame FDE ('S', expressions over the ucontext): above it
    # is stk_spin's pc where raise() was called from, then main
    exe = build("stk_signal.c", "-O2", "-fomit-frame-pointer", output="stk_signal_o2")
    (ours,) = _stacks([str(exe)], "stk_in_handler")
    names = [f.function for f in ours]
    assert names[0] == "stk_in_handler"
    assert names[names.index("stk_spin"):] [:2] == ["stk_spin", "main"] and names[-1] == "_start"
    restorer = ours[1].target.module
    assert cfi_of(restorer.elf).row_at(restorer.to_link(ours[1].pc - 1)).signal_frame  # __restore_rt's 'S'
    theirs = _gdb_bt(str(exe), "stk_in_handler")
    # gdb adds "<signal handler called>", and frames it builds from libc's debug info: inlined
    # functions and tail calls (pthread_kill jumps to __pthread_kill_implementation), which the
    # machine stack does not hold. Every frame of ours above the interrupted one is one of gdb's.
    gdb_pcs = {pc & 0xFFF for _name, pc in theirs if pc is not None}
    interrupted = next(i for i, (name, _pc) in enumerate(theirs) if name.startswith("<signal"))
    assert ours[2].function == theirs[interrupted + 1][0]  # where the signal came in
    assert all(f.pc & 0xFFF in gdb_pcs for f in ours[3:]), (theirs, [f.name for f in ours])
