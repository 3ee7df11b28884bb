"""Shared helpers for the index tests; holds no tests.

The crash tests (test_index_durability.py, test_index_uploads.py) kill a writer process mid-write and
read back what it acknowledged, so the rule for what must survive the kill is written once here; the
approximate types' tests (test_index_hnswsq.py, test_index_ivfpq.py) share their vectors and truth.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

import numpy as np

from index import ImageIndex, NewImage


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors around 20 centres: neighbour structure an approximate index can use."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def images(n: int, start: int = 0) -> list[NewImage]:
    return [NewImage(f"v/{i}.jpg", f"{i:064x}", 32, 32) for i in range(start, start + n)]


def exact_top(x: np.ndarray, q: np.ndarray, k: int, ids: np.ndarray) -> list[set[int]]:
    return [set(ids[np.argsort(-(x @ row))[:k]].tolist()) for row in q]


def recall(hits: list, truth: list[set[int]]) -> float:
    """Mean share of each query's exact top k that the search returned."""
    return float(np.mean([len({h.id for h in row} & t) / len(t) for row, t in zip(hits, truth)]))


def remove_top_hits_and_reopen(idx: ImageIndex, q: np.ndarray, hits: list, *, mmap: bool) -> ImageIndex:
    """Remove the best hit of the first 5 queries, reopen the index and check they stay gone and k stays full.

    The refined types (hnswsq, ivfpq) keep removals as tombstones, which must survive the reopen.
    """
    removed = [row[0].id for row in hits[:5]]
    assert idx.remove(removed) == 5
    idx.close()
    reopened = ImageIndex.open(idx.directory, mmap=mmap)
    assert reopened.verify()["tombstones"] == 5
    again = reopened.search_by_vector(q[:5], 10)
    assert not {h.id for row in again for h in row} & set(removed)
    assert all(len(row) == 10 for row in again)
    return reopened


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
