"""A memory-mapped index searched in a fresh process held to a memory limit (issue 14 §2, 10M in 6 GiB).

A mapped index's float16 rows are page cache: resident-set figures count every page a query has
touched (and the cached pages the kernel maps around each fault), although the kernel may drop
them at will. What a deployment needs to know is whether the search keeps its recall and latency
when the process and the page cache it pulls in are held to a budget, as `docker run --memory`
or a systemd MemoryMax would hold them. So this script evicts the file from the page cache,
starts a child in a new memory cgroup (v1 or v2) with that limit, and there opens the index as
`ImageIndex.open(mmap=True)` does (`index.snapshot.read_faiss`) and searches it as the service
searches an IVF-PQ index (`index.backends.search`), single queries on one FAISS thread. The
SQLite metadata of a served index is not part of it (the file comes from `index_bench.py`).

    .venv/bin/python bench/index_bench.py --data realistic --float16 --mmap --keep-index \\
        --work-dir /tmp/k10 --sizes 10000000 --types ivfpq --nprobe 24 --refine 8 --skip-e2e
    .venv/bin/python bench/mapped_serving.py /tmp/k10/index_bench_ivfpq_10000000.faiss --limit-gib 6 \\
        --more-queries .cache/index_bench/real_queries.f16.npy

Needs root (or a delegated cgroup) for the limit; --limit-gib 0 runs without one. Prints a table
and writes bench/results/mapped_serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GIB = 2**30


def memory_cgroup(limit_bytes: int) -> tuple[Path, str]:
    """A new memory cgroup under this process's own, limited to `limit_bytes`; (directory, version)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"]
    if v1 and Path("/sys/fs/cgroup/memory").is_dir():
        group = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/") / f"clipforge-bench-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return group, "v1"
    v2 = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    if not v2:
        raise SystemExit("no memory cgroup found in /proc/self/cgroup")
    group = Path("/sys/fs/cgroup") / v2[0].lstrip("/") / f"clipforge-bench-{os.getpid()}"
    group.mkdir()
    (group / "memory.max").write_text(str(limit_bytes))
    return group, "v2"


def cgroup_figures(group: Path, version: str) -> dict:
    """Peak memory charged to the group (process and page cache) and how often it hit the limit."""
    if version == "v1":
        return {"peak_mib": int((group / "memory.max_usage_in_bytes").read_text()) / 2**20,
                "limit_hits": int((group / "memory.failcnt").read_text())}
    peak = group / "memory.peak"
    events = dict(line.split() for line in (group / "memory.events").read_text().splitlines())
    return {"peak_mib": int(peak.read_text()) / 2**20 if peak.exists() else float("nan"),
            "limit_hits": int(events.get("max", 0))}


def evict_from_page_cache(path: Path) -> None:
    """Drop the file's clean cached pages, so the child reads (and is charged for) what it touches."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def search_child(args: argparse.Namespace) -> dict:
    """Open the mapped index here and time single queries, pass after pass over the query set."""
    import faiss
    from index_bench import anon_rss_mb, mapped_rss_mb, percentiles, rss_mb

    from index import backends
    from index.mapped_pages import RowPrefetch
    from index.snapshot import read_faiss

    path = Path(args.index).resolve()
    queries = np.load(path.with_suffix(".queries.npy"))
    truth = np.load(path.with_suffix(".truth.npy"))
    faiss.omp_set_num_threads(1)
    anon_before = anon_rss_mb()
    t0 = time.perf_counter()
    index = read_faiss(path, mmap=True)
    out = {"n": int(index.ntotal), "open_s": round(time.perf_counter() - t0, 2),
           "anon_mib_opened": round(anon_rss_mb() - anon_before, 1),
           "file_mib_resident_opened": round(mapped_rss_mb(path), 1), "passes": []}
    params = {"refine_k_factor": args.refine}
    prefetch = None if args.no_prefetch else RowPrefetch.for_index(index, mapped=True)
    out["prefetch"] = prefetch is not None
    stages = [("held-out", queries, truth)]
    if args.more_queries:
        more = np.load(args.more_queries, mmap_mode="r")
        first = np.asarray(more[: len(queries)], np.float32)
        first /= np.linalg.norm(first, axis=1, keepdims=True)
        if len(more) <= len(queries) or not np.allclose(first, queries, atol=1e-3):
            raise SystemExit(f"{args.more_queries} should begin with the kept queries and hold more")
        stages.append(("more", np.asarray(more[len(queries):], np.float32), None))
    stages += [("held-out", queries, truth)] * (args.passes - 1)
    for number, (name, rows, true_ids) in enumerate(stages):
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        times, found = [], []
        for query in rows:
            t = time.perf_counter()
            _, ids = backends.search(index, "ivfpq", query[None, :], 10, params, None, nprobe=args.nprobe,
                                     prefetch=prefetch)
            times.append(time.perf_counter() - t)
            found.append(ids[0])
        p50, p99 = percentiles(times)
        recall = None if true_ids is None else round(
            float(np.mean([len(set(a) & set(b)) / 10.0 for a, b in zip(found, true_ids)])), 4)
        out["passes"].append({
            "pass": number + 1, "queries": f"{len(rows)} {name}", "recall@10": recall,
            "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
            "major_faults_per_query": round((resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults_before)
                                            / len(rows), 1),
            "anon_mib": round(anon_rss_mb() - anon_before, 1), "file_mib_resident": round(mapped_rss_mb(path), 1),
            "process_rss_mib": round(rss_mb(), 1),
        })
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", help="a FAISS IVF-PQ file written by index_bench.py --keep-index")
    parser.add_argument("--limit-gib", type=float, default=6.0, help="memory limit of the child's cgroup; 0 for none")
    parser.add_argument("--nprobe", type=int, default=24)
    parser.add_argument("--refine", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3, help="passes over the held-out queries (the cache warms)")
    parser.add_argument("--more-queries", help="a .npy that begins with the kept queries (as index_bench's "
                        "real_queries.f16.npy does): the rest are timed after the first pass, as distinct queries")
    parser.add_argument("--no-prefetch", action="store_true", help="search without reading the candidates' rows "
                        "ahead (index.mapped_pages.RowPrefetch), as before it")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "mapped_serving.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(search_child(args)))
        return 0
    path = Path(args.index).resolve()
    if not path.is_file() or not path.with_suffix(".truth.npy").is_file():
        parser.error(f"{path} and its .queries.npy / .truth.npy (index_bench.py --keep-index) are needed")
    evict_from_page_cache(path)
    group = version = None
    if args.limit_gib > 0:
        group, version = memory_cgroup(int(args.limit_gib * GIB))

    def join_group() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    cmd = [sys.executable, __file__, str(path), "--child", "--nprobe", str(args.nprobe), "--refine", str(args.refine),
           "--passes", str(args.passes)] + (["--no-prefetch"] if args.no_prefetch else [])
    cmd += ["--more-queries", args.more_queries] if args.more_queries else []
    try:
        run = subprocess.run(cmd, check=False, capture_output=True, text=True, preexec_fn=join_group if group else None)
        limits = cgroup_figures(group, version) if group else {}
    finally:
        if group:
            group.rmdir()
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        raise SystemExit(f"the search child failed (rc {run.returncode}; -9 is the kernel's OOM killer)")
    result = {**json.loads(run.stdout.splitlines()[-1]), "limit_gib": args.limit_gib, "cgroup": version, **limits,
              "nprobe": args.nprobe, "refine_k_factor": args.refine, "file_mib": round(path.stat().st_size / 2**20, 1),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    print(f"{result['n']:,} vectors, {result['file_mib']:.0f} MiB file, rows read ahead: {result['prefetch']}, "
          f"opened mapped in {result['open_s']} s: "
          f"+{result['anon_mib_opened']:.0f} MiB anonymous, {result['file_mib_resident_opened']:.0f} MiB of the file")
    print("\n| pass | queries | recall@10 | p50 ms | p99 ms | major faults/query | +anon MiB | mapped resident MiB "
          "| process RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result["passes"]:
        recall = "-" if row["recall@10"] is None else f"{row['recall@10']:.3f}"
        print(f"| {row['pass']} | {row['queries']} | {recall} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | "
              f"{row['major_faults_per_query']} | {row['anon_mib']:.0f} | {row['file_mib_resident']:.0f} | "
              f"{row['process_rss_mib']:.0f} |")
    if group:
        print(f"\ncgroup {version} limit {args.limit_gib} GiB: peak {result['peak_mib']:.0f} MiB charged "
              f"(process and its page cache), limit reached {result['limit_hits']} times")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
