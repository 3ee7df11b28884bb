"""Shared helpers for the index crash tests (test_index_durability.py, test_index_uploads.py); holds no tests.

Both tests kill a writer process mid-write and read back what it acknowledged, so the rule for what must
survive the kill is written once here.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Acks:
    """What a killed writer acknowledged on stdout before it died."""

    added: set[int]  # ids of every returned add (`ADD ...` lines)
    deleted: set[int]  # ids of every returned remove (`DEL ...` lines)
    in_flight: set[int]  # ids of a remove announced (`WILL_DEL ...`) but not returned: may or may not have happened


def kill_9_and_read_acks(proc: subprocess.Popen) -> Acks:
    """SIGKILL a running writer and parse its ADD / WILL_DEL / DEL lines, so a test knows what must survive."""
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"writer was not killed by SIGKILL: returncode {proc.returncode}"
    added: set[int] = set()
    deleted: set[int] = set()
    in_flight: set[int] = set()
    for line in out.splitlines():
        word, *ids = line.split()
        if word == "ADD":
            added |= set(map(int, ids))
        elif word == "WILL_DEL":
            in_flight = set(map(int, ids))
        elif word == "DEL":
            deleted |= set(map(int, ids))
            in_flight = set()
    return Acks(added, deleted, in_flight)
