"""Helpers shared by the cli2 tests (test_pending, test_return, test_targets): the console
script in a subprocess, its JSON, and the kernel's own uprobes through tracefs as a reference."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CLI = [str(Path(sys.executable).with_name("pyprobes"))]  # the real console script
if not Path(CLI[0]).exists():
    CLI = [sys.executable, "-m", "pyprobes"]
TRACEFS = Path("/sys/kernel/tracing")


def cli(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kw)


def json_lines(stderr: str) -> list[dict]:
    """Every JSON line of a report (notes, which start with 'pyprobes:', left out)."""
    return [json.loads(x) for x in stderr.splitlines() if x.startswith("{")]


def last_json(stderr: str) -> dict:
    return json_lines(stderr)[-1]


def notes(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("pyprobes: ")]


def by_symbol(report: dict) -> dict[str, dict]:
    return {p["probe"].split(":", 1)[1]: p for p in report["probes"]}


def build_library(build, source: str, soname: str) -> Path:
    return build(source, "-shared", "-fPIC", output=soname)


# ---------------------------------------------------------------------------------- kernel uprobes
def tracefs_unavailable() -> str | None:
    """Why the kernel's uprobes cannot serve as a reference here, or None."""
    if os.geteuid() != 0:
        return "kernel uprobes through tracefs need root"
    if not (TRACEFS / "uprobe_events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
    if not (TRACEFS / "uprobe_events").exists():
        return f"tracefs with uprobe_events is not available at {TRACEFS}"
    return None


class KernelUprobes:
    """Kernel uprobe events on functions of one ELF file, recorded for one process in a tracing
    instance of our own (its own ring buffer), counted from its trace.

    with KernelUprobes(libc, {"getpid": file_offset, ...}) as k:
        start the command stopped; k.arm(pid); let it run; k.counts() -> {"getpid": N, ...}
    """

    def __init__(self, path: str, offsets: dict[str, int]) -> None:
        self.path = os.path.realpath(path)
        self.offsets = offsets
        self.group = f"pyprobes_t{os.getpid()}"
        self.instance = TRACEFS / "instances" / self.group
        self.added: list[str] = []

    @staticmethod
    def _append(path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # no seek: tracefs refuses it
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)

    def event_dir(self, name: str) -> Path:
        return self.instance / "events" / self.group / name

    def __enter__(self) -> "KernelUprobes":
        try:
            for name, offset in self.offsets.items():
                self._append(TRACEFS / "uprobe_events", f"p:{self.group}/{name} {self.path}:{offset:#x}")
                self.added.append(name)
            self.instance.mkdir()
            (self.instance / "buffer_size_kb").write_text("8192\n")
        except BaseException:
            self.__exit__()
            raise
        return self

    def arm(self, pid: int) -> None:
        for name in self.offsets:
            (self.event_dir(name) / "filter").write_text(f"common_pid == {pid}\n")
            (self.event_dir(name) / "enable").write_text("1\n")

    def counts(self) -> dict[str, int]:
        for name in self.offsets:
            (self.event_dir(name) / "enable").write_text("0\n")
        for stats in (self.instance / "per_cpu").glob("cpu*/stats"):
            text = stats.read_text()
            lost = re.search(r"overrun:\s*(\d+)", text)
            assert lost is None or int(lost.group(1)) == 0, f"the kernel's trace buffer overflowed: {text}"
        out = dict.fromkeys(self.offsets, 0)
        pattern = re.compile(r"\s(\w+):\s+\(0x[0-9a-f]+\)")
        for line in (self.instance / "trace").read_text().splitlines():
            if line.startswith("#"):
                continue
            m = pattern.search(line)
            if m and m.group(1) in out:
                out[m.group(1)] += 1
        return out

    def __exit__(self, *exc) -> None:
        if self.instance.exists():
            for name in self.added:
                try:
                    (self.event_dir(name) / "enable").write_text("0\n")
                except OSError:
                    pass
            try:
                self.instance.rmdir()
            except OSError:
                pass
        for name in reversed(self.added):
            try:
                self._append(TRACEFS / "uprobe_events", f"-:{self.group}/{name}")
            except OSError:
                pass
        self.added.clear()


def run_under_kernel_uprobes(probes: "KernelUprobes", argv: list[str], env: dict[str, str],
                             timeout: float = 60) -> tuple[int, str, dict[str, int]]:
    """Run ARGV as pyprobes starts a command (a fork that stops itself, SIGPIPE at its default,
    then execve; stdin /dev/null, stdout and stderr pipes), with PROBES recording exactly its
    pid from its first instruction on. Returns (exit status, stdout, counts)."""
    import signal
    import time

    exe = shutil.which(argv[0]) or argv[0]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls until execve
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGSTOP)
            os.execve(exe, argv, env)
        finally:
            os._exit(127)
    os.close(out_w)
    os.close(err_w)
    try:
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        probes.arm(pid)
        os.kill(pid, signal.SIGCONT)
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            data = os.read(out_r, 1 << 16)
            if not data:
                break
            chunks.append(data)
            assert time.monotonic() < deadline, "the command did not finish"
        while os.read(err_r, 1 << 16):
            pass
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(out_r)
        os.close(err_r)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(), probes.counts()
