"""Index benchmark: FAISS index types on random normalised vectors, and end-to-end `index build` throughput.

Vector part (random unit vectors are the hardest case for approximate search: no cluster
structure to exploit): for each size and type, build time, memory, query latency p50/p99 at
k=10 for batch 1 and batch 64, and recall@10 against exact search, sweeping efSearch / nprobe.
It uses index.backends, the code the ImageIndex itself runs.

Milvus part (--store milvus): the same vectors through the Milvus index store (index/milvus, the
code the service runs on a Milvus collection) against a milvus-lite server process on a
loopback port, or the Milvus named by --milvus (e.g. the compose profile's standalone):
build time (adds through the store until the HNSW index covers every row), recall@10 and
query latency over gRPC, sweeping ef_search.

End-to-end part: `clipforge index build` on a folder of images with an untrained checkpoint
of a preset (decoding in worker processes), next to the forward pass alone on pre-decoded
pixels: when the two rates are close, decoding is off the critical path.

    python bench/index_bench.py                                # 100k and 1M, all types, Flickr8k-1k
    python bench/index_bench.py --sizes 20000 --queries 200    # quick
    python bench/index_bench.py --data realistic --sizes 100000 --types hnsw --store faiss milvus --skip-e2e
    python bench/index_bench.py --data realistic --float16 --mmap --sizes 10000000 --types ivfpq --skip-e2e
        # 10M: the float16 cache added and scanned in chunks, the index timed as served (written, read back mapped)
Results: a table on stdout and bench/results/index_bench.json.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index import backends


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def unit_vectors(n: int, dim: int, seed: int, chunk: int = 100_000, intrinsic: int = 0) -> np.ndarray:
    """Random unit vectors; intrinsic > 0 puts them near an `intrinsic`-dim subspace, closer to real embeddings."""
    out = np.empty((n, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(12345).standard_normal((intrinsic, dim), dtype=np.float32) if intrinsic else None
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        if basis is None:
            block = rng.standard_normal((m, dim), dtype=np.float32)
        else:
            block = rng.standard_normal((m, intrinsic), dtype=np.float32) @ basis
            block += 0.1 * np.sqrt(intrinsic) * rng.standard_normal((m, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + m] = block
    return out


def realistic_vectors(n: int, queries: int, *, float16: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """Real embeddings up to their count, vectors of the mixture fitted to them beyond; real held-out queries.

    float16: the fitted set as its memory-mapped float16 cache (10M float32 vectors would not fit in memory).
    """
    import realistic_vectors as rv

    real = np.load(rv.embed_real(rv.train_model(4.0, 2), 2)["real_base"]).astype(np.float32)
    xq = np.load(rv.CACHE / "real_queries.f16.npy")[:queries].astype(np.float32)
    if n <= len(real):
        return np.ascontiguousarray(real[:n]), xq, "real clipforge embeddings (CIFAR-10 x 3 views, Flickr8k-1k)"
    fitted = rv.fitted_vectors(n, real)
    return (fitted if float16 else np.asarray(fitted, dtype=np.float32)), xq, "vectors of the mixture fitted to them"


CHUNK = 500_000  # vectors converted to float32 at a time when adding or scanning a float16 set


def add_in_chunks(index: faiss.Index, xb: np.ndarray, ids: np.ndarray) -> None:
    for start in range(0, len(xb), CHUNK):
        backends.add(index, np.asarray(xb[start : start + CHUNK], dtype=np.float32), ids[start : start + CHUNK])


def exact_top10(xb: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """Ids (positions) of the exact 10 nearest by inner product, scanning `xb` a chunk at a time."""
    best_s = np.full((len(xq), 0), -np.inf, np.float32)
    best_i = np.zeros((len(xq), 0), np.int64)
    for start in range(0, len(xb), CHUNK):
        flat = faiss.IndexFlatIP(xb.shape[1])
        flat.add(np.asarray(xb[start : start + CHUNK], dtype=np.float32))
        scores, ids = flat.search(xq, 10)
        best_s, best_i = np.hstack([best_s, scores]), np.hstack([best_i, ids + start])
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :10]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def anon_rss_mb() -> float:
    """Anonymous resident MiB (heap): a mapped file's pages, which the kernel may drop, are not in it."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("RssAnon:"))


def mapped_rss_mb(path: Path) -> float:
    """Resident MiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0.0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line: range, perms, offset, dev, inode[, path]
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) / 1024
    return total


def reopened_mapped(index: faiss.Index, path: Path) -> tuple[faiss.Index, float]:
    """`index` written to `path` and read back memory-mapped, as `ImageIndex.open(mmap=True)` reads it."""
    from index.snapshot import read_faiss

    t0 = time.perf_counter()
    faiss.write_index(index, str(path))
    return read_faiss(path, mmap=True), time.perf_counter() - t0


def percentiles(times: list[float]) -> tuple[float, float]:
    arr = np.array(times) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def timed_batches(search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int, runs: int) -> tuple[float, float]:
    """p50 and p99 milliseconds of `search` on `runs` consecutive batches of `batch` queries."""
    times = []
    for r in range(runs):
        start = (r * batch) % max(1, len(queries) - batch + 1)
        q = np.ascontiguousarray(queries[start : start + batch])
        t0 = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - t0)
    return percentiles(times)


def time_queries(index: faiss.Index, kind: str, params: dict, queries: np.ndarray, batch: int, runs: int, **knobs) -> tuple[float, float]:
    return timed_batches(lambda q: backends.search(index, kind, q, 10, params, None, **knobs), queries, batch, runs)


def recall_at_10(index: faiss.Index, kind: str, params: dict, queries: np.ndarray, truth: np.ndarray, **knobs) -> float:
    if knobs.get("half_scan") is not None:  # that path serves one query at a time
        ids = np.vstack([backends.search(index, kind, q[None, :], 10, params, None, **knobs)[1] for q in queries])
    else:
        _, ids = backends.search(index, kind, queries, 10, params, None, **knobs)
    return float(np.mean([len(set(a) & set(b)) / 10.0 for a, b in zip(ids, truth)]))


def bench_vectors(args: argparse.Namespace, save: Callable[[list[dict]], None]) -> list[dict]:
    rows: list[dict] = []
    for n in args.sizes:
        if args.data == "realistic":
            xb, xq, kind_of_data = realistic_vectors(n, args.queries, float16=args.float16)
            print(f"\n== {n:,} x {xb.shape[1]} {kind_of_data} ==", flush=True)
        else:
            kind_of_data = f"near a {args.intrinsic_dim}-d subspace" if args.intrinsic_dim else "isotropic"
            print(f"\n== {n:,} x {args.dim} random unit vectors, {kind_of_data} ==", flush=True)
            xb = unit_vectors(n, args.dim, seed=1, intrinsic=args.intrinsic_dim)
            xq = unit_vectors(args.queries, args.dim, seed=2, intrinsic=args.intrinsic_dim)
        ids = np.arange(n, dtype=np.int64)
        truth = None
        for kind in args.types if "faiss" in args.store else []:
            params = backends.IndexParams(
                hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, nlist=args.nlist, pq_m=args.pq_m,
                train_size=args.train_size, refine_k_factor=max(args.refine),
            )
            gc.collect()
            faiss.omp_set_num_threads(args.build_threads or os.cpu_count() or 1)
            before, anon_before = rss_mb(), anon_rss_mb()
            t0 = time.perf_counter()
            index, resolved = backends.new_index(kind, args.dim, params, train=xb if kind in backends.REFINED else None)
            train_s = time.perf_counter() - t0
            add_in_chunks(index, xb, ids)
            build_s = time.perf_counter() - t0
            mem, anon_mem = rss_mb() - before, anon_rss_mb() - anon_before  # a mapped float16 set's pages count in the first
            size_mb = faiss.serialize_index(index).nbytes / 2**20 if n <= 200_000 else float("nan")
            if truth is None:
                truth = exact_top10(xb, xq)
            mapped = None
            if args.mmap and kind != "flat":
                index_file = Path(args.work_dir).resolve() / f"index_bench_{kind}_{n}.faiss"
                index, write_s = reopened_mapped(index, index_file)  # the in-memory copy is freed here
                mapped = {"write_s": round(write_s, 1), "file_mib": round(index_file.stat().st_size / 2**20, 1),
                          "anon_mib_opened": round(anon_rss_mb() - anon_before, 1),
                          "file_mib_resident_opened": round(mapped_rss_mb(index_file), 1)}
                print(f"{kind}: written in {write_s:.1f}s ({mapped['file_mib']:.0f} MiB), read back mapped: "
                      f"+{mapped['anon_mib_opened']:.0f} MiB anonymous, {mapped['file_mib_resident_opened']:.0f} "
                      f"MiB of the file resident", flush=True)
            faiss.omp_set_num_threads(args.threads or os.cpu_count() or 1)
            knob_name = {"hnsw": "ef_search", "hnswsq": "ef_search", "ivfpq": "nprobe"}.get(kind)
            settings = {"hnsw": args.ef_search, "hnswsq": args.ef_search, "ivfpq": args.nprobe}.get(kind, [None])
            factors = args.refine if kind in backends.REFINED else [None]
            print(f"{kind}: built in {build_s:.1f}s (train {train_s:.1f}s), +{mem:.0f} MiB RSS "
                  f"(+{anon_mem:.0f} MiB anonymous)", flush=True)
            half = None
            if kind == "flat":  # the ImageIndex's single-query path: float16 scan, float32 re-score
                before_half = rss_mb()
                t_half = time.perf_counter()
                half = backends.HalfPrecisionScan(index)
                print(f"flat: float16 copy for single queries in {time.perf_counter() - t_half:.2f}s, "
                      f"+{rss_mb() - before_half:.0f} MiB RSS", flush=True)
                settings = [None, "half"]
            for value, factor in [(v, f) for v in settings for f in factors]:
                if value == "half":
                    knob, knobs = "single_query_scan", {"half_scan": half}
                    label = "exact, fp16 scan"  # batches of 64 still take the float32 BLAS path
                else:
                    knob, knobs = knob_name, ({knob_name: value} if knob_name else {})
                    label = (f"{knob_name}={value}" if knob_name else "exact") + (f" refine={factor}" if factor else "")
                query_params = {**resolved, "refine_k_factor": factor} if factor else resolved
                rec = recall_at_10(index, kind, query_params, xq, truth, **knobs)
                runs1 = min(args.queries, args.single_runs)
                p50_1, p99_1 = time_queries(index, kind, query_params, xq, 1, runs1, **knobs)
                p50_64, p99_64 = time_queries(index, kind, query_params, xq, 64, args.batch_runs, **knobs)
                row = {
                    "n": n, "dim": args.dim, "store": "faiss", "intrinsic_dim": args.intrinsic_dim, "type": kind, "build_s": round(build_s, 2), "train_s": round(train_s, 2),
                    "rss_mib": round(mem, 1), "anon_mib": round(anon_mem, 1), "index_mib": round(size_mb, 1),
                    "knob": knob, "value": value,
                    "refine_k_factor": factor,
                    "recall@10": round(rec, 4), "p50_ms_b1": round(p50_1, 3), "p99_ms_b1": round(p99_1, 3),
                    "p50_ms_b64": round(p50_64, 3), "p99_ms_b64": round(p99_64, 3),
                    "params": {k: v for k, v in resolved.items() if k in ("hnsw_m", "ef_construction", "nlist", "pq_m", "pq_nbits")},
                }
                if mapped is not None:
                    row["mapped"] = {**mapped, "anon_mib": round(anon_rss_mb() - anon_before, 1),
                                     "file_mib_resident": round(mapped_rss_mb(index_file), 1)}
                rows.append(row)
                resident = (f"   resident +{row['mapped']['anon_mib']:.0f} MiB anonymous, "
                            f"{row['mapped']['file_mib_resident']:.0f} MiB mapped") if mapped is not None else ""
                print(f"  {label:24s} recall@10 {rec:.3f}  batch1 p50 {p50_1:8.3f} ms p99 {p99_1:8.3f} ms   "
                      f"batch64 p50 {p50_64:8.2f} ms p99 {p99_64:8.2f} ms{resident}", flush=True)
            save(rows)
            del index, half
            if mapped is not None and args.keep_index:  # for bench/mapped_serving.py, in a fresh process
                np.save(index_file.with_suffix(".queries.npy"), np.asarray(xq, np.float32))
                np.save(index_file.with_suffix(".truth.npy"), truth)
                print(f"kept {index_file} with its queries and true top 10", flush=True)
            elif mapped is not None:
                index_file.unlink()
        if "milvus" in args.store:
            if truth is None:
                truth = exact_top10(xb, xq)
            rows += bench_milvus(args, xb, xq, truth)
            save(rows)
        del xb
    return rows


def _milvus_lite_server(data_dir: Path) -> tuple[str, subprocess.Popen]:
    """milvus-lite's gRPC server in its own process on a free loopback port: (milvus://127.0.0.1:PORT, process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"milvus://127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("milvus-lite's server did not start")


def stop_milvus_lite(proc: subprocess.Popen) -> None:
    """milvus-lite's clean shutdown on SIGINT; a kill if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_indexed(idx, lite_dir: Path | None, timeout_s: float = 3600.0) -> None:
    """Flush, then wait until the HNSW index covers every row: a Milvus server reports pending rows; milvus-lite's
    describe_index always says finished, so with our own milvus-lite this waits for each segment's HNSW file."""
    client, name = idx._client, idx.where.collection
    client.flush(name)
    deadline = time.monotonic() + timeout_s
    part = lite_dir / "collections" / name / "partitions" / "_default" if lite_dir else None
    while time.monotonic() < deadline:
        if part is None:
            state = client.describe_index(name, "vector")
            if int(state.get("pending_index_rows", 0)) == 0 and int(state.get("indexed_rows", 0)) >= int(state.get("total_rows", 0)):
                return
        else:
            segments = {f.name.removesuffix(".parquet") for f in (part / "data").glob("*.parquet")}
            indexed = {f.name.removesuffix(".vector.hnsw.idx") for f in (part / "indexes").glob("*.vector.hnsw.idx")}
            if segments and segments <= indexed:
                return
        time.sleep(0.5)


def bench_milvus(args: argparse.Namespace, xb: np.ndarray, xq: np.ndarray, truth: np.ndarray) -> list[dict]:
    """The vectors through the Milvus index store: build, recall@10 and latency per ef_search."""
    from index import NewImage
    from index.milvus import MilvusImageIndex, content_id

    work = Path(tempfile.mkdtemp(prefix="index-bench-milvus-"))
    server, proc = (args.milvus, None) if args.milvus else _milvus_lite_server(work / "milvus.db")
    n, dim = xb.shape
    hashes = [hashlib.sha256(f"bench vector {i}".encode()).hexdigest() for i in range(n)]
    position = {content_id(h): i for i, h in enumerate(hashes)}
    rows: list[dict] = []
    try:
        params = {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction}
        idx = MilvusImageIndex.create(f"{server}/bench_{n}_{os.getpid()}", "b" * 64, dim=dim, index_type="hnsw",
                                      params=params)
        t0 = time.perf_counter()
        for start in range(0, n, args.milvus_batch):
            stop = min(n, start + args.milvus_batch)
            idx.add_embeddings(xb[start:stop], [NewImage(f"v/{i}", hashes[i], 1, 1) for i in range(start, stop)])
        insert_s = time.perf_counter() - t0
        _wait_indexed(idx, None if args.milvus else work / "milvus.db")
        build_s = time.perf_counter() - t0
        print(f"milvus hnsw ({server}): {n:,} added through the store in {insert_s:.1f}s, indexed after "
              f"{build_s:.1f}s", flush=True)

        def ids_of(hits: list[list]) -> np.ndarray:
            return np.array([[position.get(h.id, -1) for h in row] + [-1] * (10 - len(row)) for row in hits])

        for ef in args.ef_search:
            found = np.vstack([ids_of(idx.search_by_vector(xq[s:s + 100], 10, ef_search=ef))
                               for s in range(0, len(xq), 100)])
            rec = float(np.mean([len(set(a) & set(b)) / 10.0 for a, b in zip(found, truth)]))
            timings = {batch: timed_batches(lambda q: idx.search_by_vector(q, 10, ef_search=ef), xq, batch, runs)  # noqa: B023
                       for batch, runs in ((1, min(args.queries, args.single_runs)), (64, args.batch_runs))}
            rows.append({
                "n": n, "dim": dim, "intrinsic_dim": args.intrinsic_dim, "store": "milvus", "type": "hnsw",
                "build_s": round(build_s, 2), "insert_s": round(insert_s, 2), "train_s": 0.0,
                "rss_mib": float("nan"), "index_mib": float("nan"), "knob": "ef_search", "value": ef,
                "refine_k_factor": None, "recall@10": round(rec, 4),
                "p50_ms_b1": round(timings[1][0], 3), "p99_ms_b1": round(timings[1][1], 3),
                "p50_ms_b64": round(timings[64][0], 3), "p99_ms_b64": round(timings[64][1], 3),
                "params": params, "server": "milvus-lite server process" if proc else args.milvus,
            })
            print(f"  ef_search={ef:<14d} recall@10 {rec:.3f}  batch1 p50 {timings[1][0]:8.3f} ms p99 "
                  f"{timings[1][1]:8.3f} ms   batch64 p50 {timings[64][0]:8.2f} ms p99 {timings[64][1]:8.2f} ms", flush=True)
        for name in (idx.where.collection, idx.where.collection + "__files"):
            idx._client.drop_collection(name)
        idx.close()
    finally:
        if proc is not None:  # its data folder goes with the work folder
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def bench_end_to_end(args: argparse.Namespace) -> dict:
    import torch

    import clipforge_cli
    from index import ImageIndex
    from index.files import iter_image_files
    from model import CLIP, CLIPInference, CLIPTokenizer, preset_config, save_checkpoint

    images = Path(args.images)
    files = iter_image_files(images)
    work = Path(tempfile.mkdtemp(prefix="index-bench-"))
    torch.manual_seed(0)
    cfg = preset_config(args.preset)
    tokenizer = CLIPTokenizer.train(["a photo of a dog", "a cat on a mat"] * 50, vocab_size=cfg.vocab_size,
                                    max_length=cfg.max_seq_len)
    save_checkpoint(work / "ckpt", CLIP(cfg), tokenizer, {"step": 0})
    clip = CLIPInference.load(work / "ckpt")
    # forward pass alone, on pixels decoded beforehand: the ceiling for the pipeline
    pixels = torch.stack([clip.preprocess(f) for f in files[: args.batch_size * 4]])
    clip.embed_pixels(pixels[: args.batch_size])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(pixels), args.batch_size):
        clip.embed_pixels(pixels[start : start + args.batch_size])
    forward_rate = len(pixels) / (time.perf_counter() - t0)
    result = {"images": len(files), "preset": args.preset, "forward_only_img_s": round(forward_rate, 1), "runs": []}
    for workers in args.e2e_workers:
        out = work / f"index-w{workers}"
        t0 = time.perf_counter()
        code = clipforge_cli.main(["index", "build", "--checkpoint", str(work / "ckpt"), "--images", str(images),
                                   "--out", str(out), "--workers", str(workers), "--batch-size", str(args.batch_size),
                                   "--quiet"])
        seconds = time.perf_counter() - t0
        count = len(ImageIndex.open(out))
        result["runs"].append({"workers": workers, "exit": code, "indexed": count, "seconds": round(seconds, 2),
                               "img_s": round(count / seconds, 1)})
        print(f"index build, {args.preset}, workers={workers}: {count} images in {seconds:.1f}s = "
              f"{count / seconds:.1f} img/s (forward pass alone {forward_rate:.1f} img/s)", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--data", choices=("random", "realistic"), default="random",
                        help="realistic: clipforge embeddings of real images, a fitted mixture past their count "
                             "(bench/realistic_vectors.py)")
    parser.add_argument("--intrinsic-dim", type=int, default=0,
                        help="0: isotropic random vectors (hardest case); e.g. 32: low intrinsic dimension like real embeddings")
    parser.add_argument("--types", nargs="+", default=["flat", "hnsw", "ivfpq"], choices=backends.INDEX_TYPES)
    parser.add_argument("--queries", type=int, default=1000, help="query vectors (recall is averaged over all)")
    parser.add_argument("--single-runs", type=int, default=300, help="timed batch-1 queries")
    parser.add_argument("--batch-runs", type=int, default=15, help="timed batch-64 queries")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--pq-m", type=int, default=None)
    parser.add_argument("--refine", type=int, nargs="+", default=[4, 16, 64],
                        help="IVF-PQ re-rank factors to sweep (0 alone: bare PQ codes)")
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=None, help="FAISS threads for queries (default: all cores)")
    parser.add_argument("--build-threads", type=int, default=None, help="FAISS threads for building (default: all cores)")
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "flickr8k-1k" / "images"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--e2e-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--store", nargs="+", choices=("faiss", "milvus"), default=["faiss"],
                        help="index stores to measure on the vectors (milvus needs clipforge[milvus])")
    parser.add_argument("--milvus", help="milvus://HOST:PORT to measure (default: a milvus-lite server started here)")
    parser.add_argument("--milvus-batch", type=int, default=5000, help="vectors per add through the Milvus store")
    parser.add_argument("--float16", action="store_true",
                        help="realistic: keep the fitted set as its mapped float16 cache (added and scanned in chunks)")
    parser.add_argument("--mmap", action="store_true",
                        help="time the approximate types written to --work-dir and read back memory-mapped, as served")
    parser.add_argument("--keep-index", action="store_true",
                        help="with --mmap: keep each written index, its queries and their true top 10 in --work-dir")
    parser.add_argument("--work-dir", default=tempfile.gettempdir(), help="where --mmap writes the index")
    parser.add_argument("--skip-vectors", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "index_bench.json"))
    args = parser.parse_args()
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, faiss {faiss.__version__}",
        "command": " ".join(sys.argv), "vectors": [], "end_to_end": None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict]) -> None:  # partial results survive an interrupted run
        report["vectors"] = rows
        out.write_text(json.dumps(report, indent=2))

    if not args.skip_vectors:
        bench_vectors(args, save)
    if not args.skip_e2e:
        if Path(args.images).is_dir():
            report["end_to_end"] = bench_end_to_end(args)
        else:
            print(f"skipping end-to-end: {args.images} not found")
    out.write_text(json.dumps(report, indent=2))
    if report["vectors"]:
        print("\n| n | store | type | setting | build s | +RSS MiB | recall@10 | b1 p50 ms | b1 p99 ms | b64 p50 ms | b64 p99 ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in report["vectors"]:
            setting = (f"{r['knob']}={r['value']}" if r["knob"] else "exact") + (
                f" refine={r['refine_k_factor']}" if r.get("refine_k_factor") else "")
            print(f"| {r['n']:,} | {r.get('store', 'faiss')} | {r['type']} | {setting} | {r['build_s']} | {r['rss_mib']} | {r['recall@10']} | "
                  f"{r['p50_ms_b1']} | {r['p99_ms_b1']} | {r['p50_ms_b64']} | {r['p99_ms_b64']} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
