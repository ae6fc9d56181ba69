"""/proc/PID/maps parsing, load bias, and the module list of live processes."""
from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest

from pyprobes.symbols import Mapping, main_module, modules, parse_maps
from pyprobes.symbols.elf import Segment
from pyprobes.symbols.maps import load_bias

MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234                       /opt/my prog/bin/tool
55d0c0a01000-55d0c0a02000 r-xp 00001000 fd:01 1234                       /opt/my prog/bin/tool
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7f0000100000-7f0000101000 r-xp 00000000 fd:01 99                         /tmp/old.so (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0                          [vdso]
"""


def test_parse_maps():
    maps = parse_maps(MAPS)
    assert len(maps) == 6
    assert maps[0] == Mapping(0x55D0C0A00000, 0x55D0C0A01000, "r--p", 0, "fd:01", 1234, "/opt/my prog/bin/tool")
    assert maps[1].offset == 0x1000 and maps[1].executable and not maps[0].executable
    assert maps[2].path == "" and maps[2].inode == 0
    assert maps[3].deleted and maps[3].path == "/tmp/old.so (deleted)"
    assert maps[5].path == "[vdso]" and not maps[5].deleted


def _m(start, end, offset):
    return Mapping(start, end, "r-xp", offset, "fd:01", 1, "/x")


def test_load_bias_shared_file_page():
    # Two segments in one file page (no separate code): page offsets alone
    # would pair the data mapping with the text segment.
    elf = SimpleNamespace(segments=(
        Segment(0x400000, 0x7F0, 0, 0x7F0, 5),
        Segment(0x600DF0, 0x230, 0xDF0, 0x228, 6),
    ))
    maps = [_m(0x400000, 0x401000, 0), _m(0x600000, 0x601000, 0)]
    assert load_bias(elf, maps) == 0
    shifted = [_m(0x7F0000400000 + m.start, 0x7F0000400000 + m.end, m.offset) for m in maps]
    assert load_bias(elf, shifted) == 0x7F0000400000


def test_load_bias_first_segment_not_at_zero():
    elf = SimpleNamespace(segments=(
        Segment(0x200000, 0x460, 0, 0x460, 4),
        Segment(0x201000, 0x115, 0x1000, 0x115, 5),
    ))
    maps = [_m(0x7F1234560000, 0x7F1234561000, 0), _m(0x7F1234561000, 0x7F1234562000, 0x1000)]
    assert load_bias(elf, maps) == 0x7F1234560000 - 0x200000
    # Only the text mapping left (say the first one was unmapped): same answer.
    assert load_bias(elf, maps[1:]) == 0x7F1234560000 - 0x200000


def test_modules_pie(spawn, pie):
    proc = spawn(pie)
    mods = modules(proc.pid)
    names = [m.name for m in mods]
    assert names[0] == "sym_loop"
    assert "libc.so.6" in names and any(n.startswith("ld-linux") for n in names)
    assert not any(n.startswith("[") for n in names)
    main = main_module(proc.pid, mods)
    assert main.path == os.path.realpath(pie) and main is mods[0]
    worker = main.elf.lookup("sym_worker")[0]
    assert main.to_runtime(worker.address) == proc.addresses["sym_worker"]
    assert main.load_bias == main.base  # PIE linked at 0


def test_modules_nopie(spawn, nopie):
    proc = spawn(nopie)
    main = main_module(proc.pid)
    assert main.load_bias == 0 and not main.elf.is_pie_or_shared
    assert main.elf.lookup("sym_worker")[0].address == proc.addresses["sym_worker"]


def test_library_linked_at_nonzero_address(spawn, pie, shlib):
    proc = spawn(pie, str(shlib))
    (lib,) = [m for m in modules(proc.pid) if m.name == shlib.name]
    func = lib.elf.lookup("sym_lib_func")[0]
    assert lib.to_runtime(func.address) == proc.addresses["sym_lib_func"]
    assert lib.load_bias == lib.base - 0x200000 != 0


def test_deleted_executable(spawn, pie, tmp_path):
    copy = tmp_path / "gone"
    shutil.copy(pie, copy)
    proc = spawn(copy)
    os.unlink(copy)
    main = main_module(proc.pid)
    assert main.deleted and main.path == str(copy)
    assert main.to_runtime(main.elf.lookup("sym_worker")[0].address) == proc.addresses["sym_worker"]


def test_process_gone():
    with pytest.raises(ProcessLookupError):
        modules(2**22 + 12345)
