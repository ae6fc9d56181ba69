"""Helpers for the return-probe tests (the fixture processes and `procs`: tests/processes.py and
tests/conftest.py)."""
from __future__ import annotations

from processes import maps, read_mem, text_differences  # noqa: F401 (the tests import them from here)
