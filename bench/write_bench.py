"""Small writes on a large index (issue 14 §2): what one add of 10,000 or one removal of 1,000 costs at 1M.

Builds an index of `--size` structured unit vectors through ImageIndex.add_embeddings (one
commit, the from-scratch build), then times rounds of `--add` new vectors and of `--remove`
removals, each one commit through the same code `index add` / `index remove` and the service
run, and single-query latency and recall@10 against exact search before and after the writes
(1 FAISS thread). Peak resident memory is read from /proc. Results: a table and
bench/results/write_bench.json.

    .venv/bin/python bench/write_bench.py                         # 1M, auto type
    .venv/bin/python bench/write_bench.py --size 100000 --rounds 2
    .venv/bin/python bench/write_bench.py --data realistic         # issue 14's realistic set (cached)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_bench import realistic_vectors, rss_mb, unit_vectors

from index import ImageIndex, segments
from index.types import NewImage


def images(start: int, count: int) -> list[NewImage]:
    return [NewImage(f"img/{i:08d}.jpg", f"{i:064x}", 640, 480, f"caption {i}") for i in range(start, start + count)]


def latency_and_recall(idx: ImageIndex, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> dict:
    """p50/p99 of single queries (ms) and recall@10 against an exact scan of `vectors` (rows carry `ids`)."""
    scores = queries @ vectors.T
    top = np.argpartition(-scores, 10, axis=1)[:, :10]
    exact = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)
    times, hits = [], 0
    for qi, q in enumerate(queries):
        t = time.perf_counter()
        found = idx.search_by_vector(q[None, :], 10)[0]
        times.append((time.perf_counter() - t) * 1e3)
        hits += len({r.id for r in found} & set(ids[exact[qi]].tolist()))
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "recall_at_10": hits / (10 * len(queries))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--type", default="auto")
    parser.add_argument("--data", choices=("subspace", "realistic"), default="subspace",
                        help="subspace: unit vectors near a 64-d subspace plus noise; realistic: clipforge embeddings "
                             "of real images and draws from a mixture fitted to them, held-out real image queries")
    parser.add_argument("--add", type=int, default=10_000)
    parser.add_argument("--remove", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3, help="add rounds, then as many removal rounds")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=0,
                        help="first search this many other queries (a served index's steady state: its pages mapped)")
    parser.add_argument("--mmap", action="store_true", help="open memory-mapped, as the service does for large indexes")
    parser.add_argument("--dir", default=None, help="where to build (default: a temporary folder, deleted after)")
    parser.add_argument("--keep", action="store_true",
                        help="with --dir: keep the built index, so a later run (e.g. --mmap) measures it without a rebuild")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "write_bench.json"))
    args = parser.parse_args()

    total = args.size + args.add * (args.rounds + 1)
    if args.data == "realistic":
        vectors, held_out, _ = realistic_vectors(total, args.queries + args.warmup)
        args.dim = vectors.shape[1]
    else:
        vectors = unit_vectors(total, args.dim, seed=1, intrinsic=64)
        held_out = unit_vectors(args.queries + args.warmup, args.dim, seed=2, intrinsic=64)
    queries, warmup = held_out[: args.queries], held_out[args.queries :]
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="write-bench-"))
    path = work / "index"
    pristine = work / "pristine"  # the built index a run with --keep leaves, measured again without a rebuild
    reuse = bool(args.dir) and (pristine / "CURRENT").is_file()
    if not reuse:
        shutil.rmtree(path, ignore_errors=True)
    result: dict = {"size": args.size, "dim": args.dim, "type": args.type, "data": args.data, "machine": platform.node(),
                    "cpus": faiss.omp_get_max_threads(), "mmap": args.mmap, "rounds": []}
    try:
        if not reuse:
            idx = ImageIndex.create(path, "bench-model", dim=args.dim, index_type=args.type)
            t = time.perf_counter()
            idx.add_embeddings(vectors[: args.size], images(0, args.size))
            result["build_s"] = time.perf_counter() - t
            idx.close()
            if args.keep:
                shutil.copytree(path, pristine, copy_function=os.link)  # generation files are never edited
        else:
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(pristine, path, copy_function=os.link)
        rss_before = rss_mb()
        idx = ImageIndex.open(path, mmap=args.mmap)
        result["index_type"] = idx.index_type
        faiss.omp_set_num_threads(1)
        result["rss_open_mb"] = rss_mb() - rss_before
        if len(warmup):
            t = time.perf_counter()
            for q in warmup:
                idx.search_by_vector(q[None, :], 10)
            result["warmup"] = {"queries": len(warmup), "seconds": time.perf_counter() - t,
                                "rss_after_mb": rss_mb() - rss_before}
        ids = np.arange(1, total + 1, dtype=np.int64)  # ids start at 1, in add order
        result["before"] = latency_and_recall(idx, vectors[: args.size], ids[: args.size], queries)
        result["rss_after_queries_mb"] = rss_mb() - rss_before  # what the index holds resident once searched
        result["float16_vectors_mb"] = args.size * args.dim * 2 / 2**20
        faiss.omp_set_num_threads(max(1, result["cpus"]))
        live = np.ones(total, dtype=bool)
        live[args.size:] = False
        end = args.size
        for r in range(args.rounds):
            t = time.perf_counter()
            report = idx.add_embeddings(vectors[end : end + args.add], images(end, args.add))
            result["rounds"].append({"op": f"add {args.add}", "seconds": time.perf_counter() - t,
                                     "added": len(report.added), "generation": idx.generation})
            live[end : end + args.add] = True
            end += args.add
        rng = np.random.default_rng(3)
        for r in range(args.rounds):
            gone = rng.choice(np.flatnonzero(live), args.remove, replace=False)
            t = time.perf_counter()
            removed = idx.remove([int(i) for i in ids[gone]])
            result["rounds"].append({"op": f"remove {args.remove}", "seconds": time.perf_counter() - t,
                                     "removed": removed, "generation": idx.generation})
            live[gone] = False
        # the same two writes with the delta segment turned off: the whole index rewritten, as before it existed
        segments.SEGMENT_FROM = 1 << 62
        gone = rng.choice(np.flatnonzero(live), args.remove, replace=False)
        t = time.perf_counter()
        idx.remove([int(i) for i in ids[gone]])
        result["rounds"].append({"op": f"remove {args.remove} + fold", "seconds": time.perf_counter() - t})
        live[gone] = False
        t = time.perf_counter()
        idx.add_embeddings(vectors[end : end + args.add], images(end, args.add))
        result["rounds"].append({"op": f"add {args.add}, no delta", "seconds": time.perf_counter() - t})
        live[end : end + args.add] = True
        faiss.omp_set_num_threads(1)
        result["after"] = latency_and_recall(idx, vectors[live], ids[live], queries)
        result["verify"] = idx.verify()
        result["info"] = {k: v for k, v in idx.info().items() if k in ("index_type", "count", "tombstones", "faiss_ntotal",
                                                                        "size_bytes", "delta_count")}
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        idx.close()
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            shutil.rmtree(path, ignore_errors=True)

    build = f"build {result['build_s']:.1f} s" if "build_s" in result else "built by an earlier run"
    print(f"{args.size:,} x {args.dim} ({result['index_type']}{', mmap' if args.mmap else ''}), {build}")
    if "warmup" in result:
        w = result["warmup"]
        print(f"warm-up: {w['queries']} queries in {w['seconds']:.1f} s, resident after them {w['rss_after_mb']:.0f} MiB")
    print(f"resident after open {result['rss_open_mb']:.0f} MiB, after {args.queries} queries "
          f"{result['rss_after_queries_mb']:.0f} MiB (float16 vectors: {result['float16_vectors_mb']:.0f} MiB)")
    print(f"{'write':<22}{'seconds':>9}")
    for row in result["rounds"]:
        print(f"{row['op']:<22}{row['seconds']:>9.2f}")
    for when in ("before", "after"):
        q = result[when]
        print(f"search {when:<7} p50 {q['p50_ms']:.2f} ms  p99 {q['p99_ms']:.2f} ms  recall@10 {q['recall_at_10']:.3f}")
    print(f"verify {result['verify']}; peak RSS {result['peak_rss_mb']:.0f} MiB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
