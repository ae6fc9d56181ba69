"""Ctrl-C while the command line is still importing the engine: one line, status 130, no
traceback. The interrupt is made to land exactly there, by an import hook."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import importlib.abc, sys

class InterruptAt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == sys.argv[1]:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, InterruptAt())
from pyprobes.cli import main
sys.exit(main(["count", "main", "--", "true"]))
"""


def test_ctrl_c_while_importing_the_engine():
    for module in ("pyprobes.engine", "iced_x86", "pyprobes.tracee.ptrace"):
        r = subprocess.run([sys.executable, "-c", SCRIPT, module], capture_output=True, text=True, timeout=60)
        assert r.returncode == 130, (module, r.stderr)
        assert r.stderr == "pyprobes: interrupted\n", (module, r.stderr)
