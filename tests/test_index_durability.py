"""Durability and concurrency: kill -9 mid-write, concurrent readers during writes, writers in two processes."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from index_helpers import kill_9_and_read_acks

from index import ImageIndex, NewImage, segments

ROOT = Path(__file__).resolve().parents[1]
DIM = 32

# A writer that never stops: it prints what it is about to remove and every acknowledged
# (returned) add and remove, so the parent knows what must survive a kill.
WRITER = r"""
import os, sys, numpy as np
from index import ImageIndex, NewImage, segments
if os.environ.get("SEGMENT_FROM"):  # the delta segment at test size (its 1M code path)
    segments.SEGMENT_FROM, segments.DELTA_SHARE = int(os.environ["SEGMENT_FROM"]), 4.0
path, seed, mode, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rng = np.random.default_rng(seed)
idx = ImageIndex.open(path)
live = [r.id for r in idx.records(0, 10_000)]
print("READY", flush=True)
step = 0
while mode == "forever" or step < rounds:
    step += 1
    n = int(rng.integers(5, 40))
    vecs = rng.standard_normal((n, idx.dim)).astype(np.float32)
    tag = f"{seed}-{step}"
    images = [NewImage(f"v/{tag}-{i}.png", f"{tag}-{i}".ljust(64, "x"), 1, 1) for i in range(n)]
    added = idx.add_embeddings(vecs, images).added
    live += added
    print("ADD " + " ".join(map(str, added)), flush=True)
    if mode == "forever" and step % 3 == 0 and len(live) > 50:
        gone = [int(i) for i in rng.choice(live, size=10, replace=False)]
        print("WILL_DEL " + " ".join(map(str, gone)), flush=True)
        idx.remove(gone)
        live = [i for i in live if i not in gone]
        print("DEL " + " ".join(map(str, gone)), flush=True)
"""


def unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def base_images(n: int) -> list[NewImage]:
    return [NewImage(f"base/{i}.png", f"base-{i}".ljust(64, "b"), 1, 1) for i in range(n)]


def start_writer(
    path: Path, seed: int, mode: str = "forever", rounds: int = 0, segment_from: int | None = None,
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if segment_from is not None:
        env["SEGMENT_FROM"] = str(segment_from)
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(seed), mode, str(rounds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def wait_ready(proc: subprocess.Popen) -> list[str]:
    line = proc.stdout.readline()
    assert line.strip() == "READY", f"writer failed to start: {line!r} {proc.stderr.read()}"
    return []


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq", "flat+delta", "hnsw+delta"])
def test_kill_9_mid_write_leaves_old_or_new_state(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """+delta: writes go to the delta segment (four times the main index, then folded in), as at 1M."""
    kind, _, delta = kind.partition("+")
    if delta:
        monkeypatch.setattr(segments, "SEGMENT_FROM", 50)
        monkeypatch.setattr(segments, "DELTA_SHARE", 4.0)
    path = tmp_path / "idx"
    idx = ImageIndex.create(path, "m" * 64, dim=DIM, index_type=kind, params={"nlist": 8})
    base = 1100 if kind == "ivfpq" else 60  # ivfpq trains once it holds 1000 vectors
    idx.add_embeddings(unit(base), base_images(base))
    assert idx.index_type == kind
    acked_add: set[int] = set(range(1, base + 1))
    acked_del: set[int] = set()
    rng = random.Random(kind)
    delta_counts: list[int] = []  # the delta's size at each reopen and at the end: a write may fold it to 0
    for attempt in range(1 if kind == "ivfpq" else 2):
        proc = start_writer(path, seed=attempt + 10 * len(kind), segment_from=50 if delta else None)
        wait_ready(proc)
        time.sleep(rng.uniform(0.05, 0.8))  # lands anywhere: between commits, inside one, in a fsync
        acks = kill_9_and_read_acks(proc)
        acked_add |= acks.added
        acked_del |= acks.deleted
        in_flight_del = acks.in_flight
        reopened = ImageIndex.open(path)
        counts = reopened.verify()  # FAISS ids == SQLite ids, counts == manifest
        live = {r.id for r in reopened.records(0, 100_000)}
        assert counts["count"] == len(live) == len(reopened)
        must_have = acked_add - acked_del - in_flight_del
        assert must_have <= live, f"acknowledged adds lost: {sorted(must_have - live)[:10]}"
        assert not (live & acked_del), "acknowledged removals came back"
        unacked = live - acked_add
        assert len(unacked) < 40 and all(i > max(acked_add) for i in unacked)  # at most the one in-flight add
        hits = reopened.search_by_vector(unit(3, seed=attempt), k=10)
        assert all(len(row) == 10 for row in hits)
        acked_add |= unacked  # committed though unacknowledged: now part of the state
        acked_del |= in_flight_del - live
        delta_counts.append(reopened.info()["delta_count"])
        reopened.close()
    idx.add_embeddings(unit(1, 98), [NewImage("after.png", "a" * 64, 1, 1)])  # a writer cleans up after the crash
    assert not [p for p in os.listdir(path) if p.endswith(".tmp")]
    delta_counts.append(idx.info()["delta_count"])
    assert any(delta_counts) == bool(delta), delta_counts
    idx.verify()


def test_two_writer_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "idx"
    ImageIndex.create(path, "m" * 64, dim=DIM, index_type="flat").close()
    procs = [start_writer(path, seed=s, mode="rounds", rounds=8) for s in (1, 2)]
    added: set[int] = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        for line in out.splitlines():
            if line.startswith("ADD "):
                added |= set(map(int, line.split()[1:]))
    idx = ImageIndex.open(path)
    assert idx.verify()["count"] == len(added) and {r.id for r in idx.records(0, 10_000)} == added


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_concurrent_readers_never_see_a_half_applied_update(tmp_path: Path, kind: str) -> None:
    idx = ImageIndex.create(tmp_path / "idx", "m" * 64, dim=DIM, index_type=kind)
    idx.add_embeddings(unit(100), base_images(100))  # never removed: every query has >= k live results
    queries = unit(32, seed=5)
    stop = threading.Event()
    errors: list[str] = []
    searches = [0]

    def reader() -> None:
        rng = np.random.default_rng(threading.get_ident() % 1000)
        while not stop.is_set():
            try:
                rows = idx.search_by_vector(queries[rng.integers(0, 32, size=4)], k=10)
                for row in rows:
                    ids = [h.id for h in row]
                    if len(row) != 10 or len(set(ids)) != 10:
                        errors.append(f"incomplete result {ids}")
                    if any(a.score < b.score - 1e-6 for a, b in itertools.pairwise(row)):
                        errors.append("unsorted result")
                searches[0] += 1
            except Exception as exc:  # noqa: BLE001 - any exception is a failure to report
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(0)
    added: list[int] = []
    try:
        for step in range(12):
            vecs = rng.standard_normal((20, DIM)).astype(np.float32)
            imgs = [NewImage(f"w/{step}-{i}.png", f"w{step}-{i}".ljust(64, "w"), 1, 1) for i in range(20)]
            added += idx.add_embeddings(vecs, imgs).added
            if step % 2:
                gone = added[:15]
                added = added[15:]
                assert idx.remove(gone) == 15
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert searches[0] > 0
    assert idx.verify()["count"] == 100 + len(added)
