"""ElfFile on freshly built fixtures, checked against binutils."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyprobes.symbols import ElfError, ElfFile, find_debug_file
from pyprobes.symbols.elf import PF_X


def nm_functions(path: Path, dynamic: bool = False) -> dict[str, int]:
    out = subprocess.run(["nm", "-D" if dynamic else "--defined-only", str(path)],
                         capture_output=True, text=True, check=True).stdout
    funcs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "TtWiI":
            funcs[parts[2]] = int(parts[0], 16)
    return funcs


def readelf_build_id(path: Path) -> str | None:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True).stdout
    m = re.search(r"Build ID: ([0-9a-f]+)", out)
    return m.group(1) if m else None


def test_functions_match_nm(pie):
    elf = ElfFile.load(pie)
    ours = {}
    for sym in elf.functions:
        ours.setdefault(sym.name, sym.address)
    expected = nm_functions(pie)
    for name in ("sym_worker", "sym_static_helper", "sym_glob_one", "sym_glob_alias", "sym_weak_fn", "main"):
        assert ours[name] == expected[name], name
    assert elf.functions == sorted(elf.functions, key=lambda s: s.address)


def test_bindings_and_undefined_imports(pie):
    elf = ElfFile.load(pie)
    (worker,) = elf.lookup("sym_worker")
    assert worker.binding == "global" and worker.size > 0 and worker.kind == "func"
    assert elf.lookup("sym_static_helper")[0].binding == "local"
    assert elf.lookup("sym_weak_fn")[0].binding == "weak"
    # puts and dlsym are imports of the executable (UNDEF): not definitions.
    assert elf.lookup("puts") == [] and elf.lookup("dlsym") == []
    assert elf.lookup("no_such_function") == []


def test_header_facts(pie, nopie, shlib):
    assert ElfFile.load(pie).is_pie_or_shared
    assert ElfFile.load(shlib).is_pie_or_shared
    assert not ElfFile.load(nopie).is_pie_or_shared
    for path in (pie, nopie):
        elf = ElfFile.load(path)
        assert elf.build_id == readelf_build_id(path)
        assert elf.has_symtab and elf.debuglink is None
        assert any(seg.flags & PF_X for seg in elf.segments)
    assert ElfFile.load(shlib).segments[0].vaddr == 0x200000


def test_libc_versions_and_ifuncs():
    libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
    if not libc.exists():
        pytest.skip("no glibc at the Debian path")
    elf = ElfFile.load(libc)
    dyn = nm_functions(libc, dynamic=True)
    # The default version keeps the plain name; an old one is spelled name@VERSION.
    assert [s.address for s in elf.lookup("realpath")] == [dyn["realpath@@GLIBC_2.3"]]
    assert [s.address for s in elf.lookup("realpath@GLIBC_2.2.5")] == [dyn["realpath@GLIBC_2.2.5"]]
    assert [s.address for s in elf.lookup("puts")] == [dyn["puts@@GLIBC_2.2.5"]]
    assert elf.lookup("strlen")[0].kind == "ifunc"
    # puts is weak, _IO_puts global: the recognisable name is the one shown.
    inner = elf.function_containing(elf.lookup("puts")[0].address + 4)
    assert inner.name == "puts"


def test_addresses_and_bytes(pie):
    elf = ElfFile.load(pie)
    (worker,) = elf.lookup("sym_worker")
    offset = elf.vaddr_to_offset(worker.address)
    assert elf.offset_to_vaddr(offset) == worker.address
    assert elf.read_vaddr(worker.address, worker.size) == pie.read_bytes()[offset : offset + worker.size]
    assert elf.function_containing(worker.address + worker.size - 1) == worker
    assert elf.function_containing(worker.address + worker.size) != worker
    assert elf.function_containing(0) is None
    with pytest.raises(ValueError):
        elf.read_vaddr(1 << 40, 4)
    with pytest.raises(ValueError):
        elf.vaddr_to_offset(1 << 40)


def test_aliases_share_an_address(pie):
    elf = ElfFile.load(pie)
    names = {s.name for s in elf.aliases(elf.lookup("sym_glob_one")[0].address)}
    assert names == {"sym_glob_one", "sym_glob_alias"}
    assert elf.function_containing(elf.lookup("sym_glob_alias")[0].address).name == "sym_glob_one"


def test_cache_follows_file_identity(pie, tmp_path):
    copy = tmp_path / "prog"
    shutil.copy(pie, copy)
    first = ElfFile.load(copy)
    assert ElfFile.load(copy) is first
    worker = first.lookup("sym_worker")[0]
    # Replaced on disk (a rebuild): a new object, and the old one refuses to
    # serve bytes that no longer belong to it.
    os.unlink(copy)
    shutil.copy(pie, copy)
    second = ElfFile.load(copy)
    assert second is not first
    with pytest.raises(ElfError):
        first.read_vaddr(worker.address, 4)


def test_not_elf(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(ElfError):
        ElfFile.load(junk)
    with pytest.raises(ElfError):
        ElfFile.load(junk)  # cached failure, same answer


def _split_debug(exe: Path, where: Path, link_dir: Path | None = None) -> tuple[Path, Path]:
    """Copy EXE to WHERE, move its symbols to a .debug file, strip it and link the two."""
    where.mkdir(parents=True, exist_ok=True)
    prog = where / exe.name
    shutil.copy(exe, prog)
    debug_dir = link_dir or where
    debug_dir.mkdir(parents=True, exist_ok=True)
    debug = debug_dir / (exe.name + ".debug")
    subprocess.run(["objcopy", "--only-keep-debug", str(prog), str(debug)], check=True)
    subprocess.run(["strip", "--strip-all", str(prog)], check=True)
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(prog)], check=True)
    return prog, debug


def test_debuglink_next_to_binary(pie, tmp_path):
    prog, debug = _split_debug(pie, tmp_path / "a")
    stripped = ElfFile.load(prog)
    assert not stripped.has_symtab and stripped.lookup("sym_worker") == []
    assert stripped.debuglink[0] == debug.name
    assert find_debug_file(stripped, debug_root=str(tmp_path / "none")) == debug
    merged = ElfFile.load_with_debug(prog, debug_root=str(tmp_path / "none"))
    assert merged.debug_file == str(debug)
    assert merged.lookup("sym_worker")[0].address == ElfFile.load(pie).lookup("sym_worker")[0].address
    assert merged.lookup("sym_static_helper")
    # Bytes still come from the binary itself (the debug file's .text is NOBITS).
    worker = merged.lookup("sym_worker")[0]
    assert merged.read_vaddr(worker.address, worker.size) == ElfFile.load(pie).read_vaddr(worker.address, worker.size)


def test_debuglink_in_dot_debug_dir(pie, tmp_path):
    prog, debug = _split_debug(pie, tmp_path / "b", link_dir=tmp_path / "b" / ".debug")
    assert find_debug_file(ElfFile.load(prog), debug_root=str(tmp_path / "none")) == debug


def test_debuglink_under_debug_root(pie, tmp_path):
    where = tmp_path / "c"
    prog, debug = _split_debug(pie, where)
    root = tmp_path / "root"
    moved = Path(str(root) + str(where.resolve())) / debug.name
    moved.parent.mkdir(parents=True)
    debug.rename(moved)
    assert find_debug_file(ElfFile.load(prog), debug_root=str(root)) == moved


def test_build_id_directory(pie, tmp_path):
    prog, debug = _split_debug(pie, tmp_path / "d")
    build_id = ElfFile.load(prog).build_id
    assert build_id
    root = tmp_path / "root"
    target = root / ".build-id" / build_id[:2] / (build_id[2:] + ".debug")
    target.parent.mkdir(parents=True)
    debug.rename(target)
    assert find_debug_file(ElfFile.load(prog), debug_root=str(root)) == target
    assert ElfFile.load_with_debug(prog, debug_root=str(root)).lookup("sym_worker")


def test_debuglink_crc_checked_without_build_id(build, tmp_path):
    exe = build("sym_loop.c", "-Wl,--build-id=none", output="sym_loop_noid")
    prog, debug = _split_debug(exe, tmp_path / "e")
    elf = ElfFile.load(prog)
    assert elf.build_id is None
    assert find_debug_file(elf, debug_root=str(tmp_path / "none")) == debug
    with open(debug, "ab") as f:
        f.write(b"\0")  # still an ELF file, but no longer the one linked
    assert find_debug_file(elf, debug_root=str(tmp_path / "none")) is None
    assert not ElfFile.load_with_debug(prog, debug_root=str(tmp_path / "none")).lookup("sym_worker")


def test_stale_build_id_debug_file_rejected(pie, build, tmp_path):
    other = build("sym_loop.c", "-Wl,--build-id=0x0123456789abcdef", output="sym_loop_other")
    prog, debug = _split_debug(pie, tmp_path / "f")
    subprocess.run(["objcopy", "--only-keep-debug", str(other), str(debug)], check=True)
    assert ElfFile.load(other).build_id != ElfFile.load(prog).build_id
    assert find_debug_file(ElfFile.load(prog), debug_root=str(tmp_path / "none")) is None
