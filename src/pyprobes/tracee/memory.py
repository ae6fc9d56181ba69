"""Reading and writing a tracee's memory.

Data is read with process_vm_readv (one system call, no stop needed). Code is written
through /proc/PID/mem, which the kernel lets a tracer use to write read-only text
(FOLL_FORCE), exactly as ptrace POKETEXT would, but in one call for many bytes.
"""
from __future__ import annotations

import os

from . import ptrace

_ATTEMPTS = 4  # the leader, then up to three live threads (each may be exiting too)


class Memory:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        # The thread whose view of the shared address space we use: the leader, until it
        # exits while other threads run on (pthread_exit in main) -- then neither
        # process_vm_readv(pid) nor /proc/PID/mem reaches the memory, and a live thread does.
        self._tid = pid
        self._fd: int | None = None

    def _mem_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(f"/proc/{self.pid}/task/{self._tid}/mem", os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def _use_live_thread(self) -> bool:
        """Switch to a thread that still has the address space; False if there is none."""
        try:
            tids = sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            return False
        for tid in tids:
            if tid == self._tid:
                continue
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        continue
            except OSError:
                continue
            self.close()
            self._tid = tid
            return True
        return False

    def read(self, address: int, size: int) -> bytes:
        for attempt in range(_ATTEMPTS):
            try:
                return self._read(address, size)
            except ProcessLookupError:
                if attempt == _ATTEMPTS - 1 or not self._use_live_thread():
                    raise
        raise AssertionError("unreachable")

    def read_upto(self, address: int, size: int) -> bytes:
        """Up to SIZE bytes at ADDRESS, stopping at the first unreadable page, in one
        process_vm_readv: a slice of a stack whose mapping's end is not known."""
        for attempt in range(_ATTEMPTS):
            try:
                return ptrace.process_vm_readv_upto(self._tid, address, size)
            except ProcessLookupError:
                if attempt == _ATTEMPTS - 1 or not self._use_live_thread():
                    raise
        raise AssertionError("unreachable")

    def _read(self, address: int, size: int) -> bytes:
        try:
            return ptrace.process_vm_readv(self._tid, address, size)
        except OSError:
            # Pages without PROT_READ (execute-only text) are still readable through /proc/PID/mem.
            data = os.pread(self._mem_fd(), size, address)
            if len(data) != size:
                raise OSError(14, f"cannot read {size} bytes at {address:#x} in PID {self.pid}")
            return data

    def write(self, address: int, data: bytes) -> None:
        for attempt in range(_ATTEMPTS):
            try:
                written = os.pwrite(self._mem_fd(), data, address)
                break
            except ProcessLookupError:
                if attempt == _ATTEMPTS - 1 or not self._use_live_thread():
                    raise
        if written != len(data):
            raise OSError(14, f"short write of {written}/{len(data)} bytes at {address:#x} in PID {self.pid}")

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def reopen(self) -> None:
        """After exec the old /proc/PID/mem file still points at the old address space."""
        self.close()
        self._tid = self.pid

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
