"""Corrupt ELF files, one defect at a time: each ends in an ElfError naming what is wrong (or a
clean result), and `pyprobes list` on it in one "pyprobes: ..." line with a non-zero status."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from elf_mutations import Layout

from pyprobes.symbols import ElfError, ElfFile

_PT_LOAD = 1


@pytest.fixture(scope="session")
def program(build) -> Path:
    return build("sym_stripped.c")


@pytest.fixture(scope="session")
def versioned(build) -> Path:
    """A shared library with a version definition section (.gnu.version_d)."""
    return build("sym_lib.c", "-shared", "-fPIC", "-Wl,--default-symver", output="libsym_versioned.so")


def patched(source: Path, tmp_path: Path, patch) -> Path:
    data = bytearray(source.read_bytes())
    patch(data, Layout.of(bytes(data)))
    out = tmp_path / source.name
    out.write_bytes(data)
    return out


def list_fails_in_one_line(path: Path, *fragments: str) -> None:
    out = subprocess.run([sys.executable, "-m", "pyprobes", "list", str(path)], capture_output=True, text=True,
                         timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith("pyprobes: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def section_header(layout: Layout, name: bytes) -> int:
    return layout.shoff + layout.sections[name][0] * layout.shentsize


def load_headers(data: bytearray, layout: Layout) -> list[int]:
    """File offsets of the PT_LOAD program headers."""
    at = [layout.phoff + i * layout.phentsize for i in range(layout.phnum)]
    return [a for a in at if struct.unpack_from("<I", data, a)[0] == _PT_LOAD]


def test_a_huge_extended_section_count_is_refused_before_reading(program, tmp_path):
    def patch(data, layout):
        struct.pack_into("<H", data, 0x3C, 0)                    # e_shnum 0: the count is in section 0
        struct.pack_into("<Q", data, layout.shoff + 32, 1 << 40)  # section 0's sh_size
    path = patched(program, tmp_path, patch)
    with pytest.raises(ElfError, match="section header table .* past the end of the file"):
        ElfFile.load(path)
    list_fails_in_one_line(path, "section header table")


def test_a_symbol_table_larger_than_the_file(program, tmp_path):
    def patch(data, layout):
        struct.pack_into("<Q", data, section_header(layout, b".symtab") + 32, 1 << 62)
    path = patched(program, tmp_path, patch)
    elf = ElfFile.load(path)
    with pytest.raises(ElfError, match="symbol table .* past the end of the file"):
        elf.functions
    list_fails_in_one_line(path, "symbol table")


def test_a_version_definition_pointing_outside_its_section(versioned, tmp_path):
    def patch(data, layout):
        _i, offset, _size = layout.sections[b".gnu.version_d"]
        struct.pack_into("<I", data, offset + 12, 0x7FFFFFF0)  # vd_aux of the first definition
    elf = ElfFile.load(patched(versioned, tmp_path, patch))
    assert [s.name for s in elf.lookup("sym_lib_func")] == ["sym_lib_func"]


@pytest.mark.parametrize("field, value, message", [
    (40, 1 << 60, "do not fit in an address space"),                # p_memsz
    (32, 1 << 30, "past the end of the file"),                      # p_filesz
    (8, 1 << 40, "past the end of the file"),                       # p_offset
    (16, 0, "overlaps or precedes"),                                # p_vaddr of the last one
])
def test_a_corrupt_loadable_segment(program, tmp_path, field, value, message):
    def patch(data, layout):
        last = load_headers(data, layout)[-1]
        if field == 40:
            struct.pack_into("<Q", data, last + 32, 0)  # filesz 0, so only memsz is wrong
        struct.pack_into("<Q", data, last + field, value)
    path = patched(program, tmp_path, patch)
    with pytest.raises(ElfError, match=message):
        ElfFile.load(path)
    list_fails_in_one_line(path, "PT_LOAD")


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Held open here, so that opening it to read would not block this test if it were opened.
    holder = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(ElfError, match="not a regular file"):
            ElfFile.load(fifo)
    finally:
        os.close(holder)
    list_fails_in_one_line(fifo, "not a regular file")  # nothing holds it now: opening it would hang


@pytest.mark.parametrize("cut", [0, 10, 63, 64, 0x200, "shoff", "symtab"])
def test_truncated_files(program, tmp_path, cut):
    data = program.read_bytes()
    layout = Layout.of(data)
    at = {"shoff": layout.shoff + 100, "symtab": layout.sections[b".symtab"][1] + 10}.get(cut, cut)
    path = tmp_path / "cut"
    path.write_bytes(data[:at])
    with pytest.raises(ElfError):
        ElfFile.load_with_debug(path).functions
    list_fails_in_one_line(path)


def test_a_debuglink_to_itself(program, tmp_path):
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy is not installed")
    path = tmp_path / "selfish"
    subprocess.run(["objcopy", "--strip-all", str(program), str(path)], check=True)
    # The debug link names the file itself (objcopy takes the CRC of the file as it is then).
    subprocess.run(["objcopy", f"--add-gnu-debuglink={path}", str(path)], check=True, cwd=tmp_path)
    elf = ElfFile.load_with_debug(path)
    assert elf.debuglink is not None and elf.debuglink[0] == "selfish"
    assert elf.debug_file is None and elf.functions == elf.frame_functions != []


def test_a_corrupt_eh_frame_keeps_the_functions_before_it(build, tmp_path):
    exe = build("sym_stripped.c")
    stripped = tmp_path / "stripped"
    subprocess.run(["strip", "-o", str(stripped), str(exe)], check=True)
    whole = ElfFile.load(stripped).frame_functions

    def patch(data, layout):
        _i, offset, size = layout.sections[b".eh_frame"]
        pos, records = offset, []
        while True:  # the third record's length runs past the section
            (length,) = struct.unpack_from("<I", data, pos)
            if length == 0 or len(records) == 3:
                break
            records.append(pos)
            pos += 4 + length
        struct.pack_into("<I", data, records[2], size * 2)
    (tmp_path / "corrupt").mkdir()
    elf = ElfFile.load(patched(stripped, tmp_path / "corrupt", patch))
    assert "corrupt .eh_frame" in elf.frame_error and "0x" in elf.frame_error
    assert 0 < len(elf.frame_functions) < len(whole)
    assert set(elf.frame_functions) < set(whole)
