"""/proc/PID/maps lines pyprobes did not expect: odd but valid lines parse as the kernel means
them; malformed ones are skipped, and the lines around them still parse."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyprobes.symbols import Mapping, parse_maps, read_maps

GOOD = "55d0c8a00000-55d0c8a02000 r-xp 00001000 fd:01 1234567                    /usr/bin/prog"
GOOD_MAPPING = Mapping(0x55D0C8A00000, 0x55D0C8A02000, "r-xp", 0x1000, "fd:01", 1234567, "/usr/bin/prog")


@pytest.mark.parametrize("line, expected", [
    ("7f00-7f01 r--p 00000000 00:00 0 ", Mapping(0x7F00, 0x7F01, "r--p", 0, "00:00", 0, "")),
    ("7f00-7f01 rw-p 00000000 00:00 0                          [anon:glibc malloc arena]",
     Mapping(0x7F00, 0x7F01, "rw-p", 0, "00:00", 0, "[anon:glibc malloc arena]")),
    ("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]",
     Mapping(0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, "--xp", 0, "00:00", 0, "[vsyscall]")),
    ("7f00-7f01 r-xp 00000000 08:01 42   /tmp/a dir/with  two spaces.so (deleted)",
     Mapping(0x7F00, 0x7F01, "r-xp", 0, "08:01", 42, "/tmp/a dir/with  two spaces.so (deleted)")),
    ("7f00-7f01 r-xp 00000000 103:02 42 /tmp/lib\\012newline.so",  # nvme device numbers, \n escaped
     Mapping(0x7F00, 0x7F01, "r-xp", 0, "103:02", 42, "/tmp/lib\\012newline.so")),
    ("7f00-7f01 r-xp 100000000 fd:01 18446744073709551615 /big",  # offset past 4 GiB, a 64-bit inode
     Mapping(0x7F00, 0x7F01, "r-xp", 1 << 32, "fd:01", (1 << 64) - 1, "/big")),
])
def test_odd_but_valid_lines(line, expected):
    assert parse_maps(f"{GOOD}\n{line}\n{GOOD}\n") == [GOOD_MAPPING, expected, GOOD_MAPPING]


@pytest.mark.parametrize("line", [
    "",
    "   ",
    "garbage",
    "7f00-7f01 r-xp",                                 # cut short
    "7f00 r-xp 00000000 fd:01 42 /no/dash",
    "7f00-zzzz r-xp 00000000 fd:01 42 /bad/hex",
    "-7f01 r-xp 00000000 fd:01 42 /no/start",
    "7f00-7f01 r-xp 0000000g fd:01 42 /bad/offset",
    "7f00-7f01 r-xp 00000000 fd:01 4x2 /bad/inode",
    "\x00\x00\x00",
])
def test_a_malformed_line_is_skipped_and_the_rest_parses(line):
    assert parse_maps(f"{GOOD}\n{line}\n{GOOD}\n") == [GOOD_MAPPING, GOOD_MAPPING]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.text(alphabet=st.sampled_from("0123456789abcdefx-:/ []()rwxps\t\n"), max_size=80),
                max_size=8))
def test_any_text_parses_or_skips_without_an_exception(lines):
    parse_maps("\n".join([GOOD, *lines, GOOD]))


def test_a_mutated_real_maps_file_parses_or_skips():
    rng = random.Random(11)
    with open("/proc/self/maps") as f:
        text = f.read()
    for _ in range(300):
        chars = list(text)
        for _ in range(rng.randint(1, 8)):
            chars[rng.randrange(len(chars))] = rng.choice("0123456789abcdefgx- :/\n")
        parse_maps("".join(chars))


@pytest.mark.skipif(shutil.which("sleep") is None, reason="no sleep(1)")
def test_a_mapped_file_whose_name_is_not_utf8(tmp_path):
    """A file name is bytes: one that is not UTF-8 (a library a user built, an old archive) is
    still a line of maps, and the others must still be read."""
    lib = b"/lib/x86_64-linux-gnu/libm.so.6"
    if not os.path.exists(lib):
        pytest.skip("no libm at the Debian path")
    odd = os.path.join(os.fsencode(tmp_path), b"lib\xff\xfe.so")
    shutil.copy(lib, odd)
    proc = subprocess.Popen([b"sleep", b"60"], env={**os.environb, b"LD_PRELOAD": odd})
    try:
        for _ in range(2000):  # until the loader has mapped it (not a timed assertion: a bound)
            with open(f"/proc/{proc.pid}/maps", "rb") as f:
                if b"\xff\xfe" in f.read():
                    break
            time.sleep(0.005)
        # Decoded as os.fsdecode does, so that the path opens the file again.
        assert os.fsdecode(odd) in {m.path for m in read_maps(proc.pid)}
    finally:
        proc.kill()
        proc.wait()
