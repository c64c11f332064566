"""The peak-memory bounds of the tests measure the command alone: ``helpers.run_measured``
must not count the memory of the pytest process that starts it (gigabytes late in the
suite), and must count what the command itself holds."""

from __future__ import annotations

import sys

from helpers import run_measured

MiB = 2 ** 20
HOLD_300_MIB = ("held = bytearray(300 * 2**20)\n"
                "for page in range(0, len(held), 4096): held[page] = 1\n"
                "raise SystemExit(3)")


def test_a_command_is_measured_without_the_memory_of_the_process_that_starts_it():
    parent_memory = bytearray(600 * MiB)
    for page in range(0, len(parent_memory), 4096):  # resident, not just reserved
        parent_memory[page] = 1
    code, _, _, idle_peak = run_measured([sys.executable, "-c", "pass"])
    assert code == 0 and 0 < idle_peak < 100 * MiB, idle_peak

    code, _, _, holding_peak = run_measured([sys.executable, "-c", HOLD_300_MIB])
    assert code == 3  # the command's own exit code
    assert 300 * MiB < holding_peak < 400 * MiB, holding_peak
