"""Service benchmark: latency and throughput of GET /search and POST /classify over real HTTP.

Starts `clipforge serve` (uvicorn on 127.0.0.1) over an untrained `tiny` checkpoint and a
100k-vector flat index (random unit vectors added through ImageIndex.add_embeddings), once with
micro-batching on and once off, and drives each endpoint at several concurrencies with a
minimal keep-alive HTTP/1.1 client (so the client costs little CPU next to the server). Both
servers run side by side and each measurement alternates between them in rounds, so load from
other jobs on a shared machine falls on both modes alike.
Every /search query is a different string, so the text cache never answers for the model.

    .venv/bin/python bench/service_bench.py --threads 1          # defaults: ~10,000 requests
    .venv/bin/python bench/service_bench.py --search-requests 300 --classify-requests 60   # quick

Prints a table and writes bench/results/service_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
THINGS = ["envelope", "circle", "square", "dog", "cat", "car", "house", "tree", "boat", "bird", "cup", "chair"]
PLACES = ["on a table", "in a field", "at night", "on the beach", "in the snow", "next to a wall", "in a box"]
LABELS = ["a dog", "a cat", "a car", "a house", "a tree"]


# ---------------------------------------------------------------------- fixtures
def make_checkpoint(directory: Path, preset: str) -> Path:
    import torch

    from model import CLIP, CLIPTokenizer, preset_config, save_checkpoint

    torch.manual_seed(0)
    cfg = preset_config(preset)
    captions = [f"a {c} {t} {p}" for c in COLORS for t in THINGS for p in PLACES]
    tokenizer = CLIPTokenizer.train(captions, vocab_size=cfg.vocab_size, max_length=cfg.max_seq_len)
    save_checkpoint(directory, CLIP(cfg), tokenizer, {"step": 0, "preset": preset})
    return directory


def make_index(directory: Path, checkpoint: Path, size: int) -> Path:
    from index import ImageIndex, NewImage
    from model import CLIPInference

    clip = CLIPInference.load(checkpoint)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((size, clip.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    images = [NewImage(f"images/{i:07d}.jpg", f"{i:064x}", 224, 224, f"synthetic image {i}") for i in range(size)]
    with ImageIndex.create(directory, clip) as idx:
        idx.add_embeddings(vectors, images)
        kind = idx.index_type
    print(f"index: {size:,} vectors, {clip.dim}-d, type {kind}", flush=True)
    return directory


def jpeg(seed: int, size: int = 224) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


# ---------------------------------------------------------------------- requests
def search_request(i: int, host: str) -> bytes:
    rng = random.Random(i)
    q = f"a {rng.choice(COLORS)} {rng.choice(THINGS)} {rng.choice(PLACES)} {i}"
    return f"GET /search?q={quote_plus(q)}&k=10 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def classify_request(image: bytes, host: str) -> bytes:
    boundary = "clipforgebenchboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="b.jpg"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n"]
    for label in LABELS:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{label}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    writer.write(raw)
    status = int((await reader.readline()).split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def drive(host: str, port: int, requests: list[bytes], concurrency: int) -> dict:
    """Send every request once over `concurrency` keep-alive connections: latencies, errors, wall time."""
    latencies: list[float] = []
    errors = 0
    queue = list(reversed(requests))

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while queue:
                raw = queue.pop()
                started = time.perf_counter()
                try:
                    status = await _send(reader, writer, raw)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "errors": errors, "seconds": time.perf_counter() - started, "requests": len(requests)}


def summarise(parts: list[dict]) -> dict[str, float]:
    """Rounds of one (endpoint, mode, concurrency) combined: percentiles over all, rate over summed wall time."""
    lat = np.array([x for p in parts for x in p["latencies"]]) * 1000
    wall = sum(p["seconds"] for p in parts)
    return {
        "requests": sum(p["requests"] for p in parts), "errors": sum(p["errors"] for p in parts),
        "seconds": round(wall, 3), "rps": round(len(lat) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
    }


# ---------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, index: Path, batching: bool, port: int, log: Path, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clipforge_cli", "serve", "--checkpoint", str(checkpoint), "--index", str(index),
           "--host", "127.0.0.1", "--port", str(port), "--batching" if batching else "--no-batching",
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become ready")


def batch_stats(port: int) -> dict[str, tuple[float, float]]:
    """(items, forward passes) so far by encoder, from the server's own /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        for prefix, target in (("clipforge_batch_size_sum{", sums), ("clipforge_batch_size_count{", counts)):
            if line.startswith(prefix):
                kind = line.split('kind="')[1].split('"')[0]
                target[kind] = float(line.rsplit(" ", 1)[1])
    return {k: (sums[k], counts.get(k, 0.0)) for k in sums}


def mean_batch(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean items per forward pass between two /metrics snapshots."""
    out = {}
    for kind, (items, passes) in after.items():
        items0, passes0 = before.get(kind, (0.0, 0.0))
        if passes > passes0:
            out[kind] = round((items - items0) / (passes - passes0), 2)
    return out


# ---------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--index-size", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--search-requests", type=int, default=1200, help="per (mode, concurrency)")
    parser.add_argument("--classify-requests", type=int, default=480, help="per (mode, concurrency)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating on/off rounds per measurement")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="server intra-op threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service_bench.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="clipforge-service-bench-"))
    try:
        t0 = time.perf_counter()
        checkpoint = make_checkpoint(work / "ckpt", args.preset)
        index = make_index(work / "index", checkpoint, args.index_size)
        print(f"fixtures built in {time.perf_counter() - t0:.1f}s", flush=True)
        images = [jpeg(seed) for seed in range(16)]
        rows: list[dict] = []
        serial = 0
        servers: dict[bool, tuple[subprocess.Popen, int]] = {}
        try:
            for batching in (True, False):  # both up at once; runs alternate between them in rounds
                port = free_port()
                servers[batching] = (start_server(checkpoint, index, batching, port, work / f"serve-{batching}.log", args), port)
                host = f"127.0.0.1:{port}"
                asyncio.run(drive("127.0.0.1", port, [search_request(10_000_000 + i, host) for i in range(64)], 8))
                asyncio.run(drive("127.0.0.1", port, [classify_request(images[0], host)] * 16, 4))
            for endpoint in ("search", "classify"):
                total_n = args.search_requests if endpoint == "search" else args.classify_requests
                per_round = max(1, total_n // args.rounds)
                for conc in args.concurrency:
                    parts: dict[bool, list[dict]] = {True: [], False: []}
                    batch_before = {b: batch_stats(port) for b, (_, port) in servers.items()}
                    for _ in range(args.rounds):  # A/B/A/B...: load drift on a shared machine hits both modes alike
                        for batching, (_, port) in servers.items():
                            host = f"127.0.0.1:{port}"
                            if endpoint == "search":
                                reqs = [search_request(serial + i, host) for i in range(per_round)]
                                serial += per_round
                            else:
                                reqs = [classify_request(images[i % len(images)], host) for i in range(per_round)]
                            parts[batching].append(asyncio.run(drive("127.0.0.1", port, reqs, conc)))
                    for batching, (_, port) in servers.items():
                        result = summarise(parts[batching])
                        batch = mean_batch(batch_before[batching], batch_stats(port))
                        rows.append({"endpoint": endpoint, "batching": batching, "concurrency": conc, **result,
                                     "mean_batch": batch})
                        print(f"{endpoint:8s} batching={'on ' if batching else 'off'} c={conc:<3d} "
                              f"{result['rps']:8.1f} req/s  p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
                              f"errors {result['errors']}  mean batch {batch}", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)

        def rps(endpoint: str, batching: bool, conc: int) -> float:
            return next(r["rps"] for r in rows if r["endpoint"] == endpoint and r["batching"] == batching and r["concurrency"] == conc)

        speedups = {
            f"{ep}_c{c}": round(rps(ep, True, c) / rps(ep, False, c), 2)
            for ep in ("search", "classify") for c in args.concurrency
        }
        total = sum(r["requests"] for r in rows)
        errors = sum(r["errors"] for r in rows)
        print()
        print("| endpoint | batching | concurrency | req/s | p50 ms | p99 ms | errors | mean batch |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['endpoint']} | {'on' if r['batching'] else 'off'} | {r['concurrency']} | {r['rps']:.1f} | "
                  f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | "
                  + ", ".join(f"{k} {v}" for k, v in r["mean_batch"].items()) + " |")
        print()
        print("batching speed-up (req/s on / off): " + ", ".join(f"{k} {v}x" for k, v in speedups.items()))
        print(f"{total:,} requests, {errors} errors")
        result = {
            "preset": args.preset, "index_size": args.index_size, "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms, "threads": args.threads, "rounds": args.rounds, "rows": rows, "speedup": speedups,
            "total_requests": total, "errors": errors, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")
        return 0 if errors == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
