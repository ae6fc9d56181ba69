"""resolve() against live fixture processes: the addresses they print are the truth."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from pyprobes.symbols import Module, SymbolError, find_module, main_module, modules, resolve, symbolize


def one(pid, spec, **kw):
    targets = resolve(pid, spec, **kw)
    assert len(targets) == 1, targets
    return targets[0]


@pytest.mark.parametrize("kind", ["pie", "nopie"])
def test_main_binary_functions(request, spawn, kind):
    exe = request.getfixturevalue(kind)
    proc = spawn(exe)
    mods = modules(proc.pid)
    for spec in ("sym_worker", f"{exe}:sym_worker",
                 f"{exe.name}:sym_worker"):
        t = one(proc.pid, spec, modules=mods)
        assert t.address == proc.addresses["sym_worker"], spec
        assert t.offset == 0 and t.symbol.name == "sym_worker" and t.symbol_address == t.address
        assert t.module.name == exe.name and t.spec == spec
    assert one(proc.pid, "sym_static_helper", modules=mods).address == proc.addresses["sym_static_helper"]
    assert one(proc.pid, "sym_weak_fn", modules=mods).address == proc.addresses["sym_weak_fn"]
    t = one(proc.pid, "sym_worker+0x3", modules=mods)
    assert t.address == proc.addresses["sym_worker"] + 3 and t.offset == 3
    assert t.name == f"{exe.name}:sym_worker+0x3"


@pytest.mark.parametrize("kind", ["pie", "nopie"])
def test_libc_functions(request, spawn, kind):
    proc = spawn(request.getfixturevalue(kind))
    mods = modules(proc.pid)
    # The executable only imports puts (UNDEF): the definition is libc's.
    for spec in ("puts", "libc:puts", "libc.so.6:puts"):
        t = one(proc.pid, spec, modules=mods)
        assert t.address == proc.addresses["puts"], spec
        assert t.module.name == "libc.so.6" and t.name == "libc.so.6:puts"
    assert one(proc.pid, "malloc", modules=mods).address == proc.addresses["malloc"]
    t = one(proc.pid, "libc:puts+4", modules=mods)
    assert t.address == proc.addresses["puts"] + 4 and t.name == "libc.so.6:puts+0x4"


def test_library_with_nonzero_link_base(spawn, pie, shlib):
    proc = spawn(pie, str(shlib))
    for spec in ("sym_lib_func", "libsym_lib:sym_lib_func", "libsym_lib.so:sym_lib_func"):
        assert one(proc.pid, spec).address == proc.addresses["sym_lib_func"], spec


def test_link_time_and_runtime_addresses(spawn, pie):
    proc = spawn(pie)
    mods = modules(proc.pid)
    main = main_module(proc.pid, mods)
    link = main.elf.lookup("sym_worker")[0].address
    t = one(proc.pid, f"sym_loop:{link:#x}", modules=mods)
    assert t.address == proc.addresses["sym_worker"] and t.symbol.name == "sym_worker"
    t = one(proc.pid, f"sym_loop:{link:#x}+2", modules=mods)
    assert t.offset == 2 and t.name == "sym_loop:sym_worker+0x2"
    t = one(proc.pid, proc.addresses["sym_worker"] + 2, modules=mods)
    assert t.symbol.name == "sym_worker" and t.offset == 2 and t.module is main
    t = one(proc.pid, proc.addresses["puts"], modules=mods)
    assert t.name == "libc.so.6:puts"
    # An alias resolves to one name, the same for every spelling.
    assert one(proc.pid, proc.addresses["sym_glob_one"], modules=mods).symbol.name == "sym_glob_one"
    assert symbolize(proc.addresses["sym_worker"], mods).name == "sym_loop:sym_worker"
    assert symbolize(8, mods) is None


def test_return_flag(spawn, pie):
    proc = spawn(pie)
    t = one(proc.pid, "sym_worker%return")
    assert t.is_return and t.address == proc.addresses["sym_worker"]
    with pytest.raises(SymbolError, match="%return"):
        resolve(proc.pid, f"{proc.addresses['sym_worker'] + 2:#x}%return")


def test_globs(spawn, pie):
    proc = spawn(pie)
    mods = modules(proc.pid)
    targets = resolve(proc.pid, "sym_glob_*", modules=mods)
    # sym_glob_alias is sym_glob_one under another name: one target.
    assert sorted(t.symbol.name for t in targets) == ["sym_glob_one", "sym_glob_three", "sym_glob_two"]
    assert len({t.address for t in targets}) == 3
    assert one(proc.pid, "sym_glob_al*", modules=mods).address == proc.addresses["sym_glob_one"]
    strs = resolve(proc.pid, "libc:str*", modules=mods)
    assert len(strs) > 20 and all(t.symbol.name.startswith("str") for t in strs)
    assert len({t.address for t in strs}) == len(strs)
    assert not any(".cold" in t.symbol.name for t in strs)
    allocs = resolve(proc.pid, "*alloc", modules=mods)
    assert proc.addresses["malloc"] in {t.address for t in allocs}
    assert {t.symbol.name for t in resolve(proc.pid, "libc:mem[cs]py", modules=mods)} >= {"memcpy"}


def test_libc_star(spawn, pie):
    """Every libc function (how long it takes: python -m bench.resolve)."""
    proc = spawn(pie)
    mods = modules(proc.pid)
    targets = resolve(proc.pid, "libc:*", modules=mods)
    assert len(targets) > 1000


def test_unknown_symbol_suggests_near_misses(spawn, pie):
    proc = spawn(pie)
    with pytest.raises(SymbolError) as info:
        resolve(proc.pid, "sym_workr")
    msg = str(info.value)
    assert "sym_workr" in msg and "did you mean" in msg and "sym_worker" in msg and "\n" not in msg
    with pytest.raises(SymbolError, match="libc.so.6.*did you mean.*malloc"):
        resolve(proc.pid, "libc:mallocc")
    with pytest.raises(SymbolError, match="no functions match 'sym_zz\\*'"):
        resolve(proc.pid, "sym_zz*")


def test_unknown_module_lists_loaded_ones(spawn, pie):
    proc = spawn(pie)
    with pytest.raises(SymbolError) as info:
        resolve(proc.pid, "libm:sin")
    msg = str(info.value)
    assert "'libm'" in msg and "libc.so.6" in msg and "sym_loop" in msg


def test_bad_specs(spawn, pie):
    proc = spawn(pie)
    with pytest.raises(SymbolError, match="bad offset"):
        resolve(proc.pid, "puts+0xzz")
    with pytest.raises(SymbolError, match="beyond the end of sym_loop:sym_worker"):
        resolve(proc.pid, "sym_worker+0x10000")
    with pytest.raises(SymbolError, match="not in any mapped module"):
        resolve(proc.pid, 0x10)
    with pytest.raises(SymbolError, match="not in the code"):
        resolve(proc.pid, "sym_loop:0x0")  # the ELF header: mapped, not code


def test_file_bytes_match_tracee_text(spawn, pie):
    proc = spawn(pie)
    mods = modules(proc.pid)
    with open(f"/proc/{proc.pid}/mem", "rb") as mem:
        for spec in ("sym_worker", "sym_static_helper", "libc:puts", "libc:malloc"):
            t = one(proc.pid, spec, modules=mods)
            file_bytes = t.module.elf.read_vaddr(t.module.to_link(t.address), t.symbol.size)
            mem.seek(t.address)
            assert mem.read(t.symbol.size) == file_bytes, spec


def test_stripped_binary_through_debuglink(spawn, pie, tmp_path):
    for layout in ("same", ".debug"):
        where = tmp_path / layout.strip(".")
        where.mkdir()
        prog = where / "stripped"
        shutil.copy(pie, prog)
        debug_dir = where / ".debug" if layout == ".debug" else where
        debug_dir.mkdir(exist_ok=True)
        debug = debug_dir / "stripped.debug"
        subprocess.run(["objcopy", "--only-keep-debug", str(prog), str(debug)], check=True)
        subprocess.run(["strip", "--strip-all", str(prog)], check=True)
        subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(prog)], check=True)
        proc = spawn(prog)
        t = one(proc.pid, "sym_worker")
        assert t.address == proc.addresses["sym_worker"]
        assert t.module.elf.debug_file == str(debug)
        assert one(proc.pid, "stripped:sym_static_helper").address == proc.addresses["sym_static_helper"]


def test_several_static_functions_of_one_name(spawn, build):
    other = Path(__file__).parent.parent / "fixtures" / "sym_dup_other.c"
    # The second source rides along as a gcc argument; its hash keys the cache.
    digest = hashlib.sha256(other.read_bytes()).hexdigest()[:12]
    exe = build("sym_dup_main.c", str(other), f"-DOTHER_SOURCE_{digest}")
    proc = spawn(exe)
    targets = resolve(proc.pid, "sym_dup")
    assert sorted(t.address for t in targets) == sorted(
        [proc.addresses["sym_dup_main"], proc.addresses["sym_dup_other"]]
    )
    assert all(t.symbol.binding == "local" for t in targets)


def _fake(*names):
    return [Module(f"/usr/lib/{n}", 0x1000 * i, 0, (), None) for i, n in enumerate(names, 1)]


def test_find_module_names():
    mods = _fake("prog", "libc.so.6", "libcrypt.so.1", "libm.so.6", "libmvec.so.1",
                 "libstdc++.so.6", "ld-linux-x86-64.so.2", "libpython3.11.so.1.0")
    assert find_module(mods, "libc").name == "libc.so.6"
    assert find_module(mods, "libm").name == "libm.so.6"
    assert find_module(mods, "libstdc++").name == "libstdc++.so.6"
    assert find_module(mods, "ld-linux").name == "ld-linux-x86-64.so.2"
    assert find_module(mods, "libpython3.11").name == "libpython3.11.so.1.0"
    assert find_module(mods, "prog").name == "prog"
    assert find_module(mods, "/usr/lib/libm.so.6").name == "libm.so.6"
    with pytest.raises(SymbolError, match="no module 'libz'.*loaded: prog, libc.so.6"):
        find_module(mods, "libz")
    with pytest.raises(SymbolError, match="ambiguous"):
        find_module(_fake("libfoo.so.1", "libfoo.so.2"), "libfoo")
