"""Resident memory of an index as a service holds it (issue 14 §2: <= 1.2x the float16 vectors).

Opens an existing index directory in this fresh process (as `clipforge serve` does, after its
imports), then searches it with single queries on 1 FAISS thread, and reports the growth of
the resident set over the process before the open: after the open, and after the queries.
Each figure is divided by the size of the vectors in float16 (n x dim x 2 bytes), the
budget's unit. A process that built the index first would measure into memory freed by the
build, so this one only opens.

    .venv/bin/python bench/write_bench.py --data realistic --dir /tmp/wb --keep   # builds /tmp/wb/pristine
    .venv/bin/python bench/index_memory.py /tmp/wb/pristine --queries 2000
    .venv/bin/python bench/index_memory.py /tmp/wb/pristine --mmap

Prints one line per stage and writes bench/results/index_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from index_bench import rss_mb

from index import ImageIndex


def main() -> int:
    """Open, search, and report the growth of the resident set at each stage."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", type=Path, help="an index directory (clipforge index build / write_bench.py --keep)")
    parser.add_argument("--queries", type=int, default=2000, help="single queries after the open")
    parser.add_argument("--mmap", action="store_true", help="open memory-mapped")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "index_memory.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    faiss.omp_set_num_threads(1)
    before = rss_mb()
    started = time.perf_counter()
    idx = ImageIndex.open(args.index, mmap=args.mmap)
    open_s = time.perf_counter() - started
    after_open = rss_mb() - before
    n, dim = len(idx), idx.dim
    float16_mib = n * dim * 2 / 2**20
    queries = rng.standard_normal((args.queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    started = time.perf_counter()
    for q in queries:
        idx.search_by_vector(q[None, :], 10)
    query_s = time.perf_counter() - started
    after_queries = rss_mb() - before
    result = {
        "index": str(args.index), "type": idx.index_type, "vectors": n, "dim": dim, "mmap": args.mmap,
        "float16_vectors_mib": round(float16_mib, 1), "open_s": round(open_s, 2),
        "resident_after_open_mib": round(after_open, 1), "resident_after_queries_mib": round(after_queries, 1),
        "queries": args.queries, "query_s": round(query_s, 2),
        "ratio_after_open": round(after_open / float16_mib, 3), "ratio_after_queries": round(after_queries / float16_mib, 3),
        "process_before_open_mib": round(before, 1), "machine": f"{platform.machine()}, {platform.node()}",
    }
    idx.close()
    print(f"{n} x {dim} {result['type']} ({'mapped' if args.mmap else 'in memory'}); float16 vectors "
          f"{float16_mib:.0f} MiB")
    print(f"after open ({open_s:.1f} s): +{after_open:.0f} MiB = {result['ratio_after_open']}x")
    print(f"after {args.queries} queries ({query_s:.1f} s): +{after_queries:.0f} MiB = {result['ratio_after_queries']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
