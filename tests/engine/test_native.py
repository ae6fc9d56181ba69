"""engine/native.py: the return-probe code's constant overhead, measured in this process."""
from __future__ import annotations

from pyprobes.engine.native import measure_overhead_ticks


def test_the_overhead_of_an_empty_probed_call_is_a_positive_number_of_ticks():
    """Its size is the machine's; that the code ran (a latency was summed) is what is checked:
    an entry routine or return trampoline that did not run would leave the sum at 0."""
    ticks = measure_overhead_ticks(100)
    assert isinstance(ticks, int) and ticks > 0
