"""The rescue handler's bytes and the ABI offsets it uses, checked against the machine's
assembler and C compiler (x86/rescue.py), and the jmp back every stepped copy now carries."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from pyprobes.x86 import classify, decode_function, prepare_slot
from pyprobes.x86.rescue import (ASSEMBLY, CODE, HANDLER_OFFSET, RESTORER_OFFSET, SIGINFO_CODE_OFFSET,
                                 UCONTEXT_EFLAGS_OFFSET, UCONTEXT_RIP_OFFSET)

OFFSETS = r"""
#define _GNU_SOURCE
#include <stddef.h>
#include <stdio.h>
#include <signal.h>
#include <ucontext.h>
int main(void) {
    printf("%zu %zu %zu\n", offsetof(ucontext_t, uc_mcontext.gregs[REG_RIP]),
           offsetof(ucontext_t, uc_mcontext.gregs[REG_EFL]), offsetof(siginfo_t, si_code));
    return 0;
}
"""


def test_ucontext_and_siginfo_offsets_match_the_c_headers(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    (tmp_path / "o.c").write_text(OFFSETS)
    subprocess.run(["gcc", "-o", str(tmp_path / "o"), str(tmp_path / "o.c")], check=True)
    out = subprocess.run([str(tmp_path / "o")], capture_output=True, text=True, check=True).stdout.split()
    assert [int(x) for x in out] == [UCONTEXT_RIP_OFFSET, UCONTEXT_EFLAGS_OFFSET, SIGINFO_CODE_OFFSET]


def test_the_code_is_what_its_assembly_says(tmp_path):
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("binutils are not installed")
    (tmp_path / "h.s").write_text(ASSEMBLY)
    subprocess.run(["as", "-o", str(tmp_path / "h.o"), str(tmp_path / "h.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "h.o"), str(tmp_path / "h.bin")],
                   check=True)
    assert (tmp_path / "h.bin").read_bytes() == CODE
    assert CODE[RESTORER_OFFSET:RESTORER_OFFSET + 7] == bytes.fromhex("b80f0000000f05")  # rt_sigreturn
    assert CODE[HANDLER_OFFSET:HANDLER_OFFSET + 3] == bytes.fromhex("4c8b35")  # mov r14, [rip + ...]


@pytest.mark.parametrize("code", [
    bytes.fromhex("f048ff0500100000"),  # lock inc qword [rip+0x1000]
    bytes.fromhex("ff1500100000"),      # call [rip+0x1000]: stepped, returns into the slot
    bytes.fromhex("f3a4"),              # rep movsb
])
def test_a_stepped_copy_carries_a_jmp_back(code):
    address, slot = 0x401000, 0x402000
    (insn,) = decode_function(code, address)
    assert classify(insn).kind.value == "stepped"
    copy = prepare_slot(insn, slot, boosted=False, jmp_back=True)
    tail = copy.bytes[copy.code.copy_length:]
    assert tail[0] == 0xE9
    end = slot + copy.code.copy_length + 5
    assert end + int.from_bytes(tail[1:5], "little", signed=True) == address + len(code)
