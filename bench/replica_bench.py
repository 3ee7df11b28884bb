"""Replica benchmark (issue 18): requests/s of GET /search with two `clipforge serve` replicas against one,
both on one Milvus collection.

Starts milvus-lite's gRPC server in its own process on a loopback port, builds one collection with
`clipforge index build --out milvus://127.0.0.1:PORT/COLLECTION` from N images (the Flickr8k-1k images
when they are present, generated JPEGs otherwise) and an untrained preset checkpoint, and starts two
replicas: `clipforge serve --index milvus://...`, the same settings and pinned thread counts for both.
Each /search load then runs closed-loop at each concurrency, with the same client code either way:
"one" sends every request to replica A (B sits idle), "two" round-robins requests across A and B
(each connection worker keeps a keep-alive connection to both and takes the next replica in turn).
The two setups alternate in rounds (one, two, one, two, ...) so load drift on a shared machine
falls on both. Every /search query is a different string, so no text cache answers.
Before and after the load, the same queries through A and through B must give the same hits:
the replicas share one collection.

    .venv/bin/python bench/replica_bench.py                              # defaults: 1,000 images, 4,800 requests
    .venv/bin/python bench/replica_bench.py --size 200 --requests 200 --rounds 2   # quick

Prints a table and writes bench/results/replica_bench.json. On one machine the replicas, Milvus and
the load generator share the same cores: this measures contention, not scale-out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_bench import _milvus_lite_server, _wait_indexed, stop_milvus_lite
from service_bench import (
    _send,
    batch_stats,
    free_port,
    jpeg,
    make_checkpoint,
    search_request,
    start_server,
    summarise,
)

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k" / "images"
SETUPS = ("one", "two")
CHECK_QUERIES = ["a dog running on the grass", "a child in a red shirt", "two people on the beach", "a black cat",
                 "a man riding a bike", "a group of people at night", "a boat on the water", "a girl jumping"]


# ---------------------------------------------------------------------- fixtures
def image_folder(work: Path, size: int, source: Path | None) -> tuple[Path, str]:
    """A folder of `size` images: copies (hard links where possible) of the first ones of `source`, or generated JPEGs.
    Not symlinks: `index build` refuses files that resolve outside the index root."""
    folder = work / "images"
    folder.mkdir()
    if source is not None and source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:size]
        if len(files) >= size:
            for f in files:
                try:
                    os.link(f, folder / f.name)
                except OSError:
                    shutil.copyfile(f, folder / f.name)
            return folder, f"{size} images of {source}"
    for i in range(size):
        (folder / f"{i:06d}.jpg").write_bytes(jpeg(i))
    return folder, f"{size} generated 224x224 JPEGs"


def build_collection(checkpoint: Path, images: Path, location: str, lite_dir: Path, workers: int) -> float:
    """`clipforge index build --out milvus://...` in a subprocess, then wait until HNSW covers every row."""
    import clipforge_cli  # noqa: F401  (fail here, not in the subprocess, when the package is missing)
    from index.milvus import MilvusImageIndex

    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "clipforge_cli", "index", "build", "--checkpoint", str(checkpoint), "--images",
           str(images), "--out", location, "--quiet", "--workers", str(workers)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"index build failed ({run.returncode}): {(run.stdout + run.stderr)[-2000:]}")
    print(run.stdout.strip().splitlines()[-1] if run.stdout.strip() else "index built", flush=True)
    idx = MilvusImageIndex.open(location)
    try:
        _wait_indexed(idx, lite_dir, timeout_s=300.0)
    finally:
        idx.close()
    return time.perf_counter() - t0


def _timed_calls(idx, queries) -> list[float]:
    """Seconds of each idx.search_by_vector(q, 10), one query at a time."""
    took = []
    for q in queries:
        t = time.perf_counter()
        idx.search_by_vector(q, 10)
        took.append(time.perf_counter() - t)
    return took


def milvus_probe(location: str, dim: int, calls: int = 24) -> dict:
    """Searches straight through the store (no service): one query per call, from 1 and from 2 client threads,
    each with its own connection. Tells whether the Milvus server answers two callers at once."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from index.milvus import MilvusImageIndex

    rng = np.random.default_rng(7)
    out = {}
    for clients in (1, 2):
        idxs = [MilvusImageIndex.open(location) for _ in range(clients)]
        try:
            for idx in idxs:
                idx.search_by_vector(rng.standard_normal((1, dim), dtype=np.float32), 10)  # warm the channel
            queries = rng.standard_normal((clients, calls, 1, dim), dtype=np.float32)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                times = [x for took in pool.map(_timed_calls, idxs, queries) for x in took]
            wall = time.perf_counter() - t0
        finally:
            for idx in idxs:
                idx.close()
        ms = np.array(times) * 1000
        out[f"clients_{clients}"] = {"calls": len(times), "calls_per_s": round(len(times) / wall, 1),
                                     "p50_ms": round(float(np.percentile(ms, 50)), 2),
                                     "p99_ms": round(float(np.percentile(ms, 99)), 2)}
    return out


# ---------------------------------------------------------------------- load
async def drive_replicas(ports: list[int], requests: list[bytes], concurrency: int) -> dict:
    """Send every request once from `concurrency` workers, each with a keep-alive connection to every replica;
    request i goes to replica i mod len(ports) (round robin). Latencies, errors, wall time, per-replica counts."""
    latencies: list[float] = []
    errors = 0
    served = [0] * len(ports)
    queue = list(reversed(list(enumerate(requests))))

    async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port)

    async def worker() -> None:
        nonlocal errors
        conns = [await connect(p) for p in ports]
        try:
            while queue:
                i, raw = queue.pop()
                r = i % len(ports)
                reader, writer = conns[r]
                started = time.perf_counter()
                try:
                    status = await _send(reader, writer, raw)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    errors += 1
                    writer.close()
                    conns[r] = await connect(ports[r])
                    continue
                latencies.append(time.perf_counter() - started)
                served[r] += 1
                if status != 200:
                    errors += 1
        finally:
            for _, writer in conns:
                writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "errors": errors, "seconds": time.perf_counter() - started,
            "requests": len(requests), "served": served}


def get_json(port: int, path: str, **params: object) -> dict:
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def same_results(ports: list[int], queries: list[str], k: int) -> dict:
    """The same queries through every replica: ids in the same order and scores within 1e-4."""
    mismatches: list[str] = []
    hits = 0
    for q in queries:
        answers = [get_json(p, "/search", q=q, k=k)["results"] for p in ports]
        hits += len(answers[0])
        ref = [(h["id"], h["score"]) for h in answers[0]]
        for other in answers[1:]:
            got = [(h["id"], h["score"]) for h in other]
            if [i for i, _ in got] != [i for i, _ in ref] or any(abs(a - b) > 1e-4 for (_, a), (_, b) in zip(got, ref)):
                mismatches.append(q)
    return {"queries": len(queries), "k": k, "hits": hits, "mismatches": mismatches, "same": not mismatches and hits > 0}


# ---------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=1000, help="images in the collection")
    parser.add_argument("--images", type=Path, default=FLICKR, help="image folder (generated JPEGs when absent)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--requests", type=int, default=1200, help="per (setup, concurrency), over all rounds")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per setup, alternating one, two, one, two, ...")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per replica (pinned)")
    parser.add_argument("--build-workers", type=int, default=1, help="decoding processes for `index build`")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "replica_bench.json")
    args = parser.parse_args()

    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="clipforge-replica-bench-"))
    milvus: subprocess.Popen | None = None
    replicas: list[tuple[subprocess.Popen, int]] = []
    try:
        t0 = time.perf_counter()
        checkpoint = make_checkpoint(work / "ckpt", args.preset)
        images, images_text = image_folder(work, args.size, args.images)
        lite_dir = work / "milvus.db"
        server, milvus = _milvus_lite_server(lite_dir)
        location = f"{server}/replica_bench"
        build_s = build_collection(checkpoint, images, location, lite_dir, args.build_workers)
        print(f"collection {location}: {images_text}, built and indexed in {build_s:.1f}s "
              f"(fixtures {time.perf_counter() - t0:.1f}s)", flush=True)

        from model import CLIPInference

        probe = milvus_probe(location, CLIPInference.load(checkpoint).dim)
        print("milvus search calls straight through the store (k 10, one query a call): " + "; ".join(
            f"{k.replace('_', ' ')}: {v['calls_per_s']} calls/s, p50 {v['p50_ms']} ms" for k, v in probe.items()), flush=True)

        os.environ["CLIPFORGE_INDEX_RELOAD_S"] = "0"  # nothing but the shared collection explains a result
        for name in ("a", "b"):
            os.environ["CLIPFORGE_MILVUS_CACHE"] = str(work / f"cache-{name}")
            port = free_port()
            replicas.append((start_server(checkpoint, location, True, port, work / f"serve-{name}.log", args), port))
        ports = [port for _, port in replicas]
        sizes = [get_json(p, "/info")["index"]["size"] for p in ports]
        if sizes != [args.size] * len(ports):
            raise SystemExit(f"the replicas see {sizes} images, not {args.size} each")
        for port in ports:  # warm-up: first forward passes, gRPC channel, batcher threads
            asyncio.run(drive_replicas([port], [search_request(10_000_000 + i, "127.0.0.1") for i in range(64)], 8))
        check_before = same_results(ports, CHECK_QUERIES, args.k)
        print(f"same results through both replicas before the load: {check_before['same']} "
              f"({check_before['queries']} queries, {check_before['hits']} hits each side)", flush=True)

        targets = {"one": ports[:1], "two": ports}
        per_round = max(1, args.requests // args.rounds)
        rows: list[dict] = []
        serial = 0
        for conc in args.concurrency:
            parts: dict[str, list[dict]] = {s: [] for s in SETUPS}
            batches: dict[str, dict[str, list[float]]] = {s: {} for s in SETUPS}  # kind -> [items, passes]
            for _ in range(args.rounds):  # one, two, one, two: drift on a shared machine hits both setups alike
                for setup in SETUPS:
                    reqs = [search_request(serial + i, "127.0.0.1") for i in range(per_round)]
                    serial += per_round
                    before = [batch_stats(p) for p in targets[setup]]
                    parts[setup].append(asyncio.run(drive_replicas(targets[setup], reqs, conc)))
                    for port, was in zip(targets[setup], before):
                        for kind, (items, passes) in batch_stats(port).items():
                            acc = batches[setup].setdefault(kind, [0.0, 0.0])
                            acc[0] += items - was.get(kind, (0.0, 0.0))[0]
                            acc[1] += passes - was.get(kind, (0.0, 0.0))[1]
            for setup in SETUPS:
                result = summarise(parts[setup])
                mean_batch = {k: round(i / n, 2) for k, (i, n) in batches[setup].items() if n}
                served = [sum(p["served"][r] for p in parts[setup]) for r in range(len(targets[setup]))]
                rows.append({"replicas": len(targets[setup]), "concurrency": conc, **result, "served_by_replica": served,
                             "mean_batch": mean_batch,
                             "round_rps": [round(len(p["latencies"]) / p["seconds"], 1) for p in parts[setup]]})
                print(f"replicas={len(targets[setup])} c={conc:<3d} {result['rps']:8.1f} req/s  p50 {result['p50_ms']:8.2f} ms  "
                      f"p99 {result['p99_ms']:8.2f} ms  errors {result['errors']}  served {served}  mean batch {mean_batch}",
                      flush=True)
        check_after = same_results(ports, CHECK_QUERIES, args.k)
        print(f"same results through both replicas after the load: {check_after['same']}", flush=True)
        logs_clean = all("Traceback" not in (work / f"serve-{n}.log").read_text(errors="replace") for n in ("a", "b"))

        def rps(n: int, conc: int) -> float:
            return next(r["rps"] for r in rows if r["replicas"] == n and r["concurrency"] == conc)

        ratios = {f"c{c}": round(rps(2, c) / rps(1, c), 2) for c in args.concurrency}
        total = sum(r["requests"] for r in rows)
        errors = sum(r["errors"] for r in rows)
        print()
        print("| replicas | concurrency | req/s | p50 ms | p99 ms | errors | requests per replica | mean batch |")
        print("|---:|---:|---:|---:|---:|---:|---|---|")
        for r in rows:
            print(f"| {r['replicas']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{r['errors']} | {' / '.join(str(s) for s in r['served_by_replica'])} | "
                  + ", ".join(f"{k} {v}" for k, v in r["mean_batch"].items()) + " |")
        print()
        print("two replicas / one (req/s): " + ", ".join(f"{k} {v}x" for k, v in ratios.items()))
        print(f"{total:,} requests, {errors} errors; same results both sides: before {check_before['same']}, "
              f"after {check_after['same']}; replica logs without tracebacks: {logs_clean}")
        result = {
            "started": started_at, "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "preset": args.preset, "size": args.size, "images": images_text, "build_s": round(build_s, 1),
            "milvus": "milvus-lite server process on 127.0.0.1", "threads": args.threads,
            "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "k": args.k, "rounds": args.rounds,
            "milvus_probe": probe, "rows": rows, "two_over_one": ratios, "same_results_before": check_before, "same_results_after": check_after,
            "total_requests": total, "errors": errors, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")
        ok = errors == 0 and check_before["same"] and check_after["same"] and logs_clean
        return 0 if ok else 1
    finally:
        for proc, _ in replicas:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if milvus is not None:
            stop_milvus_lite(milvus)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
