"""Build the benchmark's C programs with the machine's gcc into a cache directory."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = {"work": ("work.c", ["-O2", "-pthread"]), "cfloor": ("cfloor.c", ["-O2", "-Wall"])}

# The instructions bench/work.c's hand-written `hit` must start with (see its comment).
HIT_LAYOUT = (
    (0, bytes.fromhex("0f1f440000"), "nopl 0x0(%rax,%rax,1)"),
    (5, bytes.fromhex("53"), "push %rbx"),
    (6, bytes.fromhex("488d5c7f01"), "lea 0x1(%rdi,%rdi,2),%rbx"),
)
NOP_OFF, PUSH_OFF, LEA_OFF = 0, 5, 6


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Workload:
    work: Path            # the workload binary (absolute)
    cfloor: Path          # the C ptrace floor
    hit: int              # link-time address of hit
    slot: int             # link-time address of bench_slot (the hand-made slot)
    first_load: int       # vaddr of the first PT_LOAD
    hit_file_offset: int  # file offset of hit (for tracefs uprobes)


def cache_dir() -> Path:
    root = os.environ.get("PYPROBES_BENCH_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyprobes-bench"


def _gcc() -> str:
    gcc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise BuildError("no C compiler: install gcc")
    return gcc


def compile_cached(name: str, source: bytes, flags: list[str], gcc: str | None = None) -> Path:
    """The C program SOURCE compiled with FLAGS into the cache, once per source, flags and gcc."""
    gcc = gcc or _gcc()
    out_dir = cache_dir()
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source + version.encode() + " ".join(flags).encode()).hexdigest()[:16]
    out = out_dir / f"{name}-{key}"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / f"{name}-{key}.c"
    src.write_bytes(source)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([gcc, *flags, "-o", tmp, str(src)], capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"gcc failed on {src}:\n{r.stderr}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build() -> Workload:
    from pyprobes.symbols import ElfFile

    gcc = _gcc()
    work, cfloor = (compile_cached(name, (HERE / source).read_bytes(), flags, gcc).resolve()
                    for name, (source, flags) in SOURCES.items())
    elf = ElfFile.load(work)

    def address(name: str) -> int:
        found = elf.lookup(name)
        if not found:
            raise BuildError(f"{work}: no function {name}")
        return found[0].address

    hit, slot = address("hit"), address("bench_slot")
    for off, raw, text in HIT_LAYOUT:
        if elf.read_vaddr(hit + off, len(raw)) != raw:
            raise BuildError(f"{work}: hit+{off} is not `{text}`: the assembler changed the layout")
    first_load = min(seg.vaddr for seg in elf.segments)
    return Workload(work, cfloor, hit, slot, first_load, elf.vaddr_to_offset(hit))
