"""Numbers a user can mistype are refused before anything starts: one line, status 2, and the
command given after -- never runs (nan passes a `<= 0` check, and used to fail after the run)."""
from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "pyprobes"]


@pytest.mark.parametrize("args, message", [
    (["count", "-d", "nan"], "--duration must be a positive number of seconds"),
    (["count", "-i", "nan"], "--interval must be a positive number of seconds"),
    (["count", "-d", "inf"], "--duration must be a positive number of seconds"),
    (["trace", "-d", "nan"], "--duration must be a positive number of seconds"),
    (["count", "--busy-wait", "nan"], "--busy-wait must be 0 or more microseconds"),
])
def test_nan_and_inf_are_refused_before_the_command_runs(args, message, tmp_path):
    marker = tmp_path / "ran"
    r = subprocess.run([*CLI, *args, "main", "--", "touch", str(marker)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert r.stderr.strip() == f"pyprobes: {message}"
    assert not marker.exists()


def test_demo_rounds_out_of_range():
    r = subprocess.run([*CLI, "demo", "--rounds", "99999999999999999999"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == "pyprobes: --rounds must be between 1 and 10,000,000"
