"""Targets as they come: a stripped binary with a separate debug file, a command that forks or
execs, and real programs of the machine measured against the kernel's own uprobes."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from cli2_util import (CLI as CLI_ARGS, KernelUprobes, by_symbol, cli, last_json, notes,
                       run_under_kernel_uprobes, tracefs_unavailable)
from pyprobes.symbols import ElfFile

PYTHON = "/usr/bin/python3"  # Debian's own, not a shim or a venv
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


# ---------------------------------------------------------------------------------- debug link
@pytest.mark.parametrize("where", ["beside", ".debug"])
def test_stripped_binary_with_a_debug_link(build, tmp_path, where):
    if shutil.which("objcopy") is None or shutil.which("strip") is None:
        pytest.skip("binutils (objcopy, strip) are not installed")
    exe = tmp_path / "hidden"
    shutil.copy(build("cli2_hidden.c"), exe)
    debug_dir = tmp_path if where == "beside" else tmp_path / ".debug"
    debug_dir.mkdir(exist_ok=True)
    debug = debug_dir / "hidden.debug"
    for cmd in (["objcopy", "--only-keep-debug", exe, debug], ["strip", "--strip-all", exe],
                ["objcopy", f"--add-gnu-debuglink={debug}", exe]):
        # --add-gnu-debuglink records the file name only; the CRC is taken from DEBUG here.
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    assert not ElfFile.load(exe).has_symtab and ElfFile.load(exe).debuglink[0] == "hidden.debug"
    r = cli("count", "--json", "-v", "hidden_step", "--", str(exe), "7")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hidden_step=7 ")
    row = by_symbol(last_json(r.stderr))["hidden_step"]
    assert row["hits"] == 7 and row["module"] == "hidden"
    # The static function exists only in the debug file: without it, a clear error.
    debug.unlink()
    r = cli("count", "hidden_step", "--", str(exe), "7")
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("pyprobes: no function 'hidden_step'")


# ---------------------------------------------------------------------------------- fork / exec
def test_forked_children_run_probed_code_unharmed(build):
    exe = build("cli2_fork.c")
    kids, n = 3, 200
    r = cli("count", "--json", "work", "spawn_child%return", "--", str(exe), str(kids), str(n))
    # The parent's status; every child ran its probed calls and exited 0; system()'s shell too.
    assert r.returncode == 3, r.stderr
    assert r.stdout == f"children ok={kids} bad=0 system=4 work={n}\n"
    assert "killed by signal" not in r.stderr
    assert notes(r.stderr) == []  # system()'s child execs, the traced process does not
    report = last_json(r.stderr)
    assert report["exit_code"] == 3
    rows = by_symbol(report)
    assert rows["work"]["hits"] == n  # the parent's calls: children go on untraced
    assert rows["spawn_child%return"]["hits"] == kids


def test_exec_is_reported_and_probes_follow(build):
    execer = build("cli2_exec.c")
    target = build("cli_target.c")
    r = cli("count", "--json", "libc:getppid", "exec_work", "--", str(execer), "4", str(target), "6", "0",
            "exit:7")
    assert r.returncode == 7, r.stderr
    assert r.stdout.startswith("exec_work=4 sum=")
    assert r.stdout.endswith("cli_add=6 getppid=6 sum=" + str(3 * 6 * 5 // 2 + 4662 * 6) + "\n")
    report = last_json(r.stderr)
    assert report["exit_code"] == 7
    rows = by_symbol(report)
    assert rows["getppid"]["hits"] == 4 + 6  # before the exec, and in the new program
    assert rows["getppid"]["mode"] in ("optimized", "boosted", "emulated", "stepped")
    assert rows["exec_work"]["hits"] == 4 and rows["exec_work"]["mode"] == "unloaded"
    said = [x for x in notes(r.stderr) if "executed" in x]
    assert len(said) == 1 and str(target) in said[0]
    assert len(notes(r.stderr)) == 1  # and nothing else


@pytest.fixture(scope="module")
def static_target(build):
    try:
        return build("cli_target.c", "-static", output="cli_target_static")
    except RuntimeError as e:
        pytest.skip(f"no static glibc to link with: {str(e).splitlines()[-1]}")


def test_static_program_and_an_exec_into_one(build, static_target):
    # A static program has no loader to report a library list (its _dl_debug_state is for a
    # static dlopen): probes go in at its entry, and at once after an exec into one.
    r = cli("count", "--json", "cli_add", "--", str(static_target), "5")
    assert r.returncode == 0, r.stderr
    assert by_symbol(last_json(r.stderr))["cli_add"]["hits"] == 5
    execer = build("cli2_exec.c")
    r = cli("count", "--json", "getppid", "--", str(execer), "2", str(static_target), "3")
    assert r.returncode == 0, r.stderr
    rows = last_json(r.stderr)["probes"]
    assert {row["probe"]: row["hits"] for row in rows} == {"libc.so.6:getppid": 2, "cli_target_static:getppid": 3}


def test_exec_of_a_program_that_fails(build):
    execer = build("cli2_exec.c")
    r = cli("count", "--json", "libc:getppid", "--", str(execer), "2", "/bin/sh", "-c", "exit 5")
    assert r.returncode == 5, r.stderr
    assert last_json(r.stderr)["exit_code"] == 5
    assert by_symbol(last_json(r.stderr))["getppid"]["hits"] >= 2
    assert len([x for x in notes(r.stderr) if "executed /usr/bin/dash" in x or "executed /bin/" in x]) == 1


# ---------------------------------------------------------------------------------- real programs
def _offsets(path: str, names: list[str]) -> dict[str, int]:
    elf = ElfFile.load(os.path.realpath(path))
    out = {}
    for name in names:
        syms = elf.lookup(name)
        assert syms and syms[0].kind == "func", f"{name} is no plain function in {path}"
        out[name] = elf.vaddr_to_offset(syms[0].address)
    return out


REAL = {
    # name: (library, its short name, functions with deterministic counts, program text)
    "libc": (LIBC, "libc", ["getpid", "getppid", "malloc", "free", "calloc", "realloc", "getenv",
                            "sigaction"],
             "import os\nfor i in range(100): os.getpid()\nfor i in range(7): os.getppid()\n"
             "print(sorted({i * 7 % 13 for i in range(50)}))"),
    # A library Python dlopens on `import ctypes` (through _ctypes): probed while pending.
    "libffi": ("/usr/lib/x86_64-linux-gnu/libffi.so.8", "libffi", ["ffi_call", "ffi_prep_cif"],
               "import ctypes\nf = ctypes.CDLL(None).getpid\nprint(len({f() for i in range(50)}))"),
}


@pytest.mark.parametrize("case", sorted(REAL))
def test_real_program_counts_equal_the_kernels_uprobes(case):
    if not os.access(PYTHON, os.X_OK):
        pytest.skip(f"{PYTHON} is not installed")
    library, short, names, program = REAL[case]
    if not os.path.exists(library):
        pytest.skip(f"{library} is not installed")
    why = tracefs_unavailable()
    if why:
        pytest.skip(why)
    argv = [PYTHON, "-c", program]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": "/nonexistent"}
    plain = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert plain.returncode == 0, plain.stderr
    with KernelUprobes(library, _offsets(library, names)) as kernel:
        status, out, reference = run_under_kernel_uprobes(kernel, argv, env)
    assert status == 0 and out == plain.stdout
    r = cli("count", "--json", *[f"{short}:{n}" for n in names], "--", *argv, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout  # the program's output is unchanged
    rows = by_symbol(last_json(r.stderr))
    ours = {name: rows[name]["hits"] for name in names}
    assert ours == reference
    assert all(rows[n]["missed"] == 0 for n in names)
    if case == "libc":
        assert reference["getpid"] >= 100 and reference["getppid"] == 7 and reference["malloc"] > 100
    else:
        assert reference["ffi_call"] == 50


# ---------------------------------------------------------------------------------- thousands
def _text_identical_to_file(pid: int, path_part: str) -> int:
    """Every executable mapping of the module whose path contains PATH_PART reads as its file."""
    checked = 0
    with open(f"/proc/{pid}/maps") as f:
        maps = [line.split() for line in f]
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for fields in maps:
            if len(fields) < 6 or "x" not in fields[1] or path_part not in fields[5]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mem.seek(start)
            with open(fields[5], "rb") as lib:
                lib.seek(int(fields[2], 16))
                assert mem.read(end - start) == lib.read(end - start), f"{fields[5]} differs from its file"
            checked += end - start
    return checked


def test_ctrl_c_while_placing_every_libc_function(build):
    target = build("cli_target.c")
    fx = subprocess.Popen([str(target), "3000", "1000"], stdout=subprocess.PIPE, text=True)
    pp = None
    try:
        assert fx.stdout.readline() == "ready\n"
        pp = subprocess.Popen([*CLI_ARGS, "count", "--json", "-v", "-p", str(fx.pid), "libc:*"],
                              stderr=subprocess.PIPE, text=True)
        while " -> libc.so.6:" not in pp.stderr.readline():  # placing has begun
            assert pp.poll() is None, "pyprobes ended before placing"
        pp.send_signal(signal.SIGINT)  # mid-placement: the session ends once they are all in
        err = pp.stderr.read()
        pp.wait(timeout=60)
        assert pp.returncode == 0, err[-2000:]
        assert "interrupted" not in err and "Traceback" not in err
        report = last_json(err)
        assert report["exit_code"] is None and len(report["probes"]) > 1000
        assert "libc:*: " in err and "probes placed" in err
        assert fx.poll() is None, "the fixture should still be running"
        assert _text_identical_to_file(fx.pid, "libc.so") > 1 << 20
        out, _ = fx.communicate(timeout=30)
        assert out == f"cli_add=3000 getppid=3000 sum={3 * 3000 * 2999 // 2 + 4662 * 3000}\n"
        assert fx.returncode == 0
    finally:
        for p in (pp, fx):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
