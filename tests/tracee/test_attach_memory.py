"""Attach to a process pyprobes did not start, patch its read-only text and restore it,
detach: the program runs on as if nothing happened."""
from __future__ import annotations

from pyprobes.symbols import ElfFile, main_module


def _expected_result() -> int:
    return sum((i * i) % 7 for i in range(1000))


def test_attach_patch_readonly_text_restore_detach(procs, fixture):
    exe = fixture("tr_textpatch")
    proc = procs.start(exe)
    ready = proc.wait_output(r"^ready .*\n")[0]
    line = ready.split()
    assert line[0] == "ready"
    compute = int(line[1], 16)

    # compute() is in a read-only, executable mapping of the file.
    mod = main_module(proc.pid)
    mapping = mod.mapping_at(compute)
    assert mapping is not None and mapping.perms.startswith("r-x"), mapping
    elf = ElfFile.load(exe)
    offset = elf.vaddr_to_offset(mod.to_link(compute))
    file_bytes = exe.read_bytes()[offset:offset + 32]

    tracee = procs.attach_tracee(proc)
    snap = tracee.freeze()
    assert snap.tids == {proc.pid}

    original = tracee.memory.read(compute, 32)
    assert original == file_bytes
    patched = bytes(b ^ 0xFF for b in original)
    tracee.memory.write(compute, patched)
    assert tracee.memory.read(compute, 32) == patched
    # Private copy-on-write: the file on disk is untouched.
    assert exe.read_bytes()[offset:offset + 32] == file_bytes
    tracee.memory.write(compute, original)
    assert tracee.memory.read(compute, 32) == original

    tracee.detach()
    assert not tracee.attached
    with open(f"/proc/{proc.pid}/status") as f:
        assert "TracerPid:\t0\n" in f.read()
    proc.write("go\n")
    proc.close_stdin()
    assert proc.wait_exit() == 3
    out = proc.output.read_to_eof()[len(ready):]
    assert out == f"result {_expected_result()}\n"
