"""Reading and writing a tracee's memory.

Data is read with process_vm_readv (one system call, no stop needed). Code is written
through /proc/PID/mem, which the kernel lets a tracer use to write read-only text
(FOLL_FORCE), exactly as ptrace POKETEXT would, but in one call for many bytes.
"""
from __future__ import annotations

import os

from . import ptrace


class Memory:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = None

    def _mem_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def read(self, address: int, size: int) -> bytes:
        try:
            return ptrace.process_vm_readv(self.pid, address, size)
        except OSError:
            # Pages without PROT_READ (execute-only text) are still readable through /proc/PID/mem.
            data = os.pread(self._mem_fd(), size, address)
            if len(data) != size:
                raise OSError(14, f"cannot read {size} bytes at {address:#x} in PID {self.pid}")
            return data

    def write(self, address: int, data: bytes) -> None:
        written = os.pwrite(self._mem_fd(), data, address)
        if written != len(data):
            raise OSError(14, f"short write of {written}/{len(data)} bytes at {address:#x} in PID {self.pid}")

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def reopen(self) -> None:
        """After exec the old /proc/PID/mem file still points at the old address space."""
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
