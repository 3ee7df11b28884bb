"""Filtered-search benchmark: latency and recall@10 of ImageIndex.search_by_vector with metadata filters.

Through the code the service runs (SQLite for the passing ids, index/filtered.py for the vectors),
at 1%, 10%, 50% and 100% of the images passing, on an exact (flat) and an approximate index
(`auto` picks hnswsq up to 250k and ivfpq beyond). Recall is against a brute-force ranking of the passing images.
Vectors: unit vectors near a 32-d subspace (index_bench.py's structured set), or the realistic
set (--data realistic, bench/realistic_vectors.py's cache).

    .venv/bin/python bench/filter_bench.py --sizes 100000 --types flat hnswsq
    .venv/bin/python bench/filter_bench.py --sizes 1000000 --types ivfpq --data realistic --queries 100
Results: a table on stdout and bench/results/filter_bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_bench import percentiles, realistic_vectors, unit_vectors

from index import ImageIndex, NewImage
from index.search_filter import SearchFilter

# (label, filter, which rows pass): folders split the images 100 ways, caption tags 10 ways, widths 2 ways
FILTERS = [
    ("1% (path prefix)", SearchFilter(path_prefix="f00/"), lambda i: i % 100 == 0),
    ("10% (caption text)", SearchFilter(caption_contains="tag3"), lambda i: i % 10 == 3),
    ("50% (min width)", SearchFilter(min_width=150), lambda i: i % 2 == 1),
    ("100% (min width)", SearchFilter(min_width=1), lambda i: True),
    ("none", None, lambda i: True),
]


def images(n: int) -> list[NewImage]:
    return [NewImage(f"f{i % 100:02d}/{i:08d}.jpg", f"{i:064x}", 100 + 100 * (i % 2), 100, f"photo tag{i % 10}")
            for i in range(n)]


def truth_top10(xb: np.ndarray, xq: np.ndarray, passes: np.ndarray) -> np.ndarray:
    """Brute-force top 10 row numbers among the passing rows, in chunks (bounded memory)."""
    rows = np.flatnonzero(passes)
    best_s = np.full((len(xq), 0), -np.inf, np.float32)
    best_i = np.zeros((len(xq), 0), np.int64)
    for start in range(0, len(rows), 200_000):
        part = rows[start : start + 200_000]
        s = xq @ xb[part].T
        s = np.concatenate([best_s, s], 1)
        i = np.concatenate([best_i, np.broadcast_to(part, (len(xq), len(part)))], 1)
        keep = np.argsort(-s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    for n in args.sizes:
        if args.data == "realistic":
            xb, xq, source = realistic_vectors(n, args.queries)
        else:
            xb = unit_vectors(n, args.dim, seed=0, intrinsic=32)
            xq = unit_vectors(args.queries, args.dim, seed=1, intrinsic=32)
            source = "unit vectors near a 32-d subspace"
        xq = np.ascontiguousarray(xq / np.linalg.norm(xq, axis=1, keepdims=True), dtype=np.float32)
        meta = images(n)
        for kind in args.types:
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                faiss.omp_set_num_threads(args.build_threads)
                t0 = time.perf_counter()
                idx = ImageIndex.create(Path(tmp) / "idx", "filter-bench", dim=xb.shape[1], index_type=kind)
                idx.add_embeddings(xb, meta)
                build_s = time.perf_counter() - t0
                idx.close()
                idx = ImageIndex.open(Path(tmp) / "idx")
                faiss.omp_set_num_threads(args.threads)
                t = time.perf_counter()
                idx.search_by_vector(xq[:1], 10, filter=SearchFilter(min_width=2))  # loads the filter columns
                load_s = time.perf_counter() - t
                print(f"n={n:,} {kind}: built in {build_s:.1f} s ({source}); filter columns loaded in {load_s:.2f} s",
                      flush=True)
                for label, conditions, rule in FILTERS:
                    passes = np.fromiter((rule(i) for i in range(n)), dtype=bool, count=n)
                    truth = truth_top10(xb, xq, passes)
                    found = [idx.search_by_vector(q[None], 10, filter=conditions)[0] for q in xq]
                    ids = [[int(h.path[4:12]) for h in hits] for hits in found]
                    recall = float(np.mean([len(set(a) & set(b.tolist())) / 10 for a, b in zip(ids, truth)]))
                    times = []
                    for r in range(args.runs):
                        q = xq[r % len(xq)][None]
                        t = time.perf_counter()
                        idx.search_by_vector(q, 10, filter=conditions)
                        times.append(time.perf_counter() - t)
                    ids_ms = None
                    if conditions is not None:
                        t = time.perf_counter()
                        for _ in range(5):
                            idx._state.columns.matching(conditions)
                        ids_ms = (time.perf_counter() - t) / 5 * 1000
                    p50, p99 = percentiles(times)
                    row = {"n": n, "columns_load_s": round(load_s, 2), "type": idx.index_type, "filter": label, "passing": int(passes.sum()),
                           "recall@10": round(recall, 4), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                           "ids_ms": None if ids_ms is None else round(ids_ms, 2), "build_s": round(build_s, 1),
                           "full_k": all(len(h) == 10 for h in found)}
                    rows.append(row)
                    print(f"  {label:<20} pass {row['passing']:>9,}  recall@10 {recall:.3f}  p50 {p50:7.2f} ms  "
                          f"p99 {p99:7.2f} ms  passing ids {row['ids_ms']} ms  k filled {row['full_k']}", flush=True)
                idx.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--types", nargs="+", default=["flat", "hnswsq"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--data", choices=("structured", "realistic"), default="structured")
    parser.add_argument("--queries", type=int, default=200, help="queries for recall")
    parser.add_argument("--runs", type=int, default=200, help="timed single queries per row")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads for queries")
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="folder for the temporary indexes")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "filter_bench.json"))
    args = parser.parse_args()
    rows = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.node(), "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
