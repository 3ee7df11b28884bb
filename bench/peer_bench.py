"""Peer benchmark (issue 16, section 5): clipforge's service against infinity and clip-retrieval's back end.

Every server serves THE SAME WEIGHTS: a ViT-B/32-sized transformers CLIPModel with random weights
(bench/peer_weights.py), loaded by infinity (`infinity_emb v2 --model-id DIR`) and clip-retrieval
(`hf_clip:DIR`) as it is, and by clipforge after `clipforge model import hf:DIR`; the bench checks
that by comparing their embeddings of the same inputs (in process, over HTTP, and clip-retrieval's
stored index vectors), each beside the cosine of different inputs. clipforge is measured twice:
its default torch path, and `clipforge serve --onnx` on its own ONNX export of the same checkpoint
(`clipforge model export CKPT --to onnx:DIR`; --no-onnx skips it), and with `serve --precision bf16` (and its
index built with `--precision bf16`; --no-bf16 skips it); each gets its own goal verdicts. infinity runs twice too:
float32 and `--dtype int8` (its dynamic quantisation, the fastest mode it offers on a CPU: it applies bfloat16 on
CUDA only), so a reduced-precision clipforge meets a reduced-precision peer. Each peer runs from its own
bench-only virtual environment (bench/peer_venvs.sh builds them under .cache/peers; never a
project dependency). Every server binds 127.0.0.1, gets the same thread count (OMP_NUM_THREADS /
MKL_NUM_THREADS, and clipforge's --threads) and batch limit, and every measurement alternates
between the servers in rounds (the order rotating each round), so load from other jobs on a
shared machine falls on all alike. Every text is a different string, so no cache answers.

Rows: text embedding (clipforge /embed/text, infinity /embeddings), image embedding (clipforge
/embed/image, infinity /embeddings with modality image; clip-retrieval offers neither alone) and
text-to-image search over the same Flickr8k images (clipforge /search, clip-retrieval
/knn-service; infinity has no search), at each concurrency: requests/s, p50, p99, errors and the
peak resident memory of the server's processes during that row. Also `clipforge index build`
against `clip-retrieval inference` (+ `clip-retrieval index`) on those images, images/s.

    bash bench/peer_venvs.sh                                    # once: the peers' environments
    .venv/bin/python bench/peer_bench.py --threads 2            # the real run
    .venv/bin/python bench/peer_bench.py --text-requests 16 --image-requests 8 --search-requests 16 --rounds 2 --concurrency 1 8 --limit-images 64

Prints a table and writes bench/results/peer_bench.json. A peer that cannot be installed or
started is reported with the exact error line, and the other servers are still measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_builds import (
    BUILD_TOOLS,
    build_clip_retrieval,
    build_clipforge,
    clip_retrieval_agreement,
    clip_retrieval_paths,
    clipforge_index_dir,
)
from peer_load import (
    ENDPOINTS,
    MULTIPART,
    REQUESTS,
    SERVED_NAME,
    K,
    caption,
    data_uri,
    image_form,
    knn_payload,
    run_drive,
)
from peer_servers import (
    CACHE,
    Server,
    peak_rss_mib,
    reset_peak_rss,
    start_clip_back,
    start_clipforge,
    start_infinity,
    stop,
)
from peer_weights import (
    ROOT,
    agreement,
    build_hf_folder,
    check_agreement,
    export_onnx,
    import_checkpoint,
)
from service_bench import summarise

DATA = ROOT.parent / "shared" / "data" / "flickr8k-1k"


# ---------------------------------------------------------------------- measurement
def measure(servers: list[Server], images: list[bytes], args: argparse.Namespace) -> list[dict]:
    rows, serial = [], 0
    totals = {"text_embedding": args.text_requests, "image_embedding": args.image_requests, "search": args.search_requests}
    for endpoint in ENDPOINTS:
        offering = [s for s in servers if endpoint in REQUESTS[s.name]]
        if not offering:
            continue
        per_round = max(1, totals[endpoint] // args.rounds)
        for conc in args.concurrency:
            parts: dict[str, list[dict]] = {s.name: [] for s in offering}
            for s in offering:
                reset_peak_rss(s.proc.pid)
            for r in range(args.rounds):
                for s in offering[r % len(offering):] + offering[:r % len(offering)]:  # rotate the order each round
                    reqs = [REQUESTS[s.name][endpoint](serial + i, images[(serial + i) % len(images)], s.host)
                            for i in range(per_round)]
                    serial += per_round
                    parts[s.name].append(run_drive(s.port, reqs, conc, args.round_timeout))
            for s in offering:
                row = {"endpoint": endpoint, "server": s.name, "concurrency": conc, **summarise(parts[s.name]),
                       "peak_rss_mib": peak_rss_mib(s.proc.pid),
                       "timed_out_rounds": sum(1 for p in parts[s.name] if p.get("timed_out")),
                       "load_average_1m": load_average()[0]}
                rows.append(row)
                print(f"{endpoint:15s} {s.name:14s} c={conc:<3d} {row['rps']:8.1f} req/s  p50 {row['p50_ms']} ms  "
                      f"p99 {row['p99_ms']} ms  errors {row['errors']}  peak RSS {row['peak_rss_mib']} MiB  "
                      f"load {row['load_average_1m']}", flush=True)
    return rows


def _post(url: str, payload: dict | None = None, body: bytes | None = None, ctype: str = "application/json") -> dict:
    data = body if body is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _cos(x: list[float], y: list[float]) -> float:
    a, b = np.asarray(x), np.asarray(y)
    return round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 6)


def infinity_agreement(cf: Server, inf: Server, images: list[bytes]) -> dict[str, float]:
    """clipforge's and infinity's answers for the same text and image, beside those for different ones."""
    texts = ["a dog running on the beach", "two people sit on a bench in the snow"]

    def text(server: Server, t: str) -> list[float]:
        if server is cf:
            return _post(f"http://{cf.host}/embed/text", {"texts": [t]})["embeddings"][0]
        return _post(f"http://{inf.host}/embeddings", {"model": SERVED_NAME, "input": [t]})["data"][0]["embedding"]

    def image(server: Server, img: bytes) -> list[float]:
        if server is cf:
            return _post(f"http://{cf.host}/embed/image", body=image_form(img), ctype=MULTIPART)["results"][0]["embedding"]
        return _post(f"http://{inf.host}/embeddings", {"model": SERVED_NAME, "input": [data_uri(img)],
                                                       "modality": "image"})["data"][0]["embedding"]

    t_cf, t_inf = [text(cf, t) for t in texts], [text(inf, t) for t in texts]
    i_cf, i_inf = [image(cf, x) for x in images[:2]], [image(inf, x) for x in images[:2]]
    return {"text_min_cosine": min(_cos(a, b) for a, b in zip(t_cf, t_inf)),
            "different_texts_max_cosine": max(_cos(t_cf[0], t_inf[1]), _cos(t_cf[1], t_inf[0])),
            "image_min_cosine": min(_cos(a, b) for a, b in zip(i_cf, i_inf)),
            "different_images_max_cosine": max(_cos(i_cf[0], i_inf[1]), _cos(i_cf[1], i_inf[0]))}


def search_agreement(cf: Server, cr: Server, cr_paths: list[str], queries: int = 8) -> dict[str, float]:
    """Top-k overlap and top-1 score gap between clipforge /search and clip-retrieval /knn-service."""
    overlaps, gaps = [], []
    for i in range(queries):
        q = caption(10_000_000 + i)
        with urllib.request.urlopen(f"http://{cf.host}/search?{urllib.parse.urlencode({'q': q, 'k': K})}", timeout=120) as r:
            ours = json.loads(r.read())["results"]
        theirs = _post(f"http://{cr.host}/knn-service", knn_payload(q))
        overlaps.append(len({Path(h["path"]).name for h in ours} & {Path(cr_paths[h["id"]]).name for h in theirs}) / K)
        gaps.append(abs(ours[0]["score"] - theirs[0]["similarity"]))
    return {"search_top10_overlap_mean": round(float(np.mean(overlaps)), 3),
            "search_top1_score_max_gap": round(float(max(gaps)), 6), "queries": queries}


# ---------------------------------------------------------------------- goals and report
def goals(rows: list[dict], builds: list[dict], concurrencies: list[int], *, me: str = "clipforge") -> list[dict]:
    """Issue 16's goals for one clipforge server (`me`) against every peer (a server not named clipforge*)."""
    def pick(endpoint: str, conc: int, key: str, peers: bool) -> list[tuple[str, float]]:
        return [(r["server"], r[key]) for r in rows if r["endpoint"] == endpoint and r["concurrency"] == conc
                and r[key] is not None and (not r["server"].startswith("clipforge") if peers else r["server"] == me)]

    out, top = [], max(concurrencies)
    for endpoint, factor in (("text_embedding", 1.5), ("search", 1.5), ("image_embedding", 1.2)):
        peer, mine = max(pick(endpoint, top, "rps", True), key=lambda x: x[1], default=None), pick(endpoint, top, "rps", False)
        if peer and mine:
            ratio = round(mine[0][1] / peer[1], 2) if peer[1] else float("inf")
            out.append({"goal": f"{endpoint} c={top} req/s >= {factor}x best peer ({peer[0]} {peer[1]})",
                        "value": f"{mine[0][1]} req/s = {ratio}x", "met": ratio >= factor})
    if 1 in concurrencies:
        for endpoint in ENDPOINTS:
            peer, mine = min(pick(endpoint, 1, "p99_ms", True), key=lambda x: x[1], default=None), pick(endpoint, 1, "p99_ms", False)
            if peer and mine:
                out.append({"goal": f"{endpoint} c=1 p99 below every peer's (best {peer[0]} {peer[1]} ms)",
                            "value": f"{mine[0][1]} ms", "met": mine[0][1] < peer[1]})
    cf = next((b for b in builds if b["tool"] == BUILD_TOOLS.get(me) and "images_per_s" in b), None)
    cr = next((b for b in builds if b["tool"] == "clip-retrieval inference" and "images_per_s" in b), None)
    if cf and cr:
        ratio = round(cf["images_per_s"] / cr["images_per_s"], 2)
        out.append({"goal": f"index build >= 1.5x clip-retrieval inference ({cr['images_per_s']} images/s)",
                    "value": f"{cf['images_per_s']} images/s = {ratio}x", "met": ratio >= 1.5})
    return [{"server": me, **g} for g in out]


def print_report(rows: list[dict], builds: list[dict], met: list[dict], unavailable: dict[str, str]) -> None:
    print()
    print("| endpoint | server | concurrency | req/s | p50 ms | p99 ms | errors | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['endpoint']} | {r['server']} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['errors']} | {r['peak_rss_mib']} |")
    print()
    for b in builds:
        if "images_per_s" not in b:
            print(f"{b['tool']}: NOT RUN: {b['error']}")
            continue
        extra = f"; then clip-retrieval index {b['index_seconds']} s" if "index_seconds" in b else ""
        print(f"{b['tool']}: {b['images_per_s']} images/s ({b['images']} images, {b['seconds']} s{extra})")
    print()
    for g in met:
        print(f"{'MET    ' if g['met'] else 'NOT MET'} {g['server']}: {g['goal']}: {g['value']}")
    for peer, why in unavailable.items():
        print(f"{peer}: not run here: {why}")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--text-requests", type=int, default=480, help="per (server, concurrency)")
    parser.add_argument("--image-requests", type=int, default=160, help="per (server, concurrency)")
    parser.add_argument("--search-requests", type=int, default=480, help="per (server, concurrency)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads of every server and build")
    parser.add_argument("--workers", type=int, default=1, help="image decoding workers of both index builds")
    parser.add_argument("--max-batch-size", type=int, default=32, help="most items per forward pass, clipforge and infinity")
    parser.add_argument("--build-batch-size", type=int, default=32)
    parser.add_argument("--peers", nargs="*", default=["infinity", "infinity-int8", "clip-retrieval"],
                        help="infinity (float32), infinity-int8 (its --dtype int8, the fastest it runs on a CPU), "
                             "clip-retrieval")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure clipforge serve --precision bf16 and index build --precision bf16")
    parser.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure clipforge serve --onnx (its own ONNX export of the same checkpoint)")
    parser.add_argument("--limit-images", type=int, default=None, help="index only the first N images (smoke runs)")
    parser.add_argument("--skip-build", action="store_true", help="reuse the last run's indexes (development)")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--round-timeout", type=float, default=600, help="bound on one round's wall time (s)")
    parser.add_argument("--build-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peer_bench.json")
    return parser.parse_args()


def image_folder(work: Path, limit: int | None) -> Path:
    images = DATA / "images"
    if not images.is_dir():
        raise SystemExit(f"{images} is missing: the bench needs the Flickr8k images (../shared/data)")
    if not limit:
        return images
    subset = work / "images"
    subset.mkdir(exist_ok=True)
    for path in sorted(images.glob("*.jpg"))[:limit]:
        if not (subset / path.name).exists():
            shutil.copyfile(path, subset / path.name)  # copies: the index build does not follow symlinks
    return subset


def build_indexes(ckpt: Path, hf: Path, images: Path, work: Path, args: argparse.Namespace) -> tuple[Path, Path | None, list[dict]]:
    """clipforge's index (and its bf16 build, which the bf16 server serves), then clip-retrieval's."""
    if args.skip_build and (work / "builds.json").is_file():
        builds = json.loads((work / "builds.json").read_text())
        return clipforge_index_dir(work), (work / "cr-index" if (work / "cr-index").is_dir() else None), builds
    cf_index, row = build_clipforge(ckpt, images, work, args)
    builds, cr_index = [row], None
    if args.bf16:
        builds.append(build_clipforge(ckpt, images, work, args, precision="bf16")[1])
    if "clip-retrieval" in args.peers:
        try:
            cr_index, row = build_clip_retrieval(hf, images, work, args)
            builds.append(row)
        except (RuntimeError, OSError) as exc:
            builds.append({"tool": "clip-retrieval inference", "error": str(exc)})
    (work / "builds.json").write_text(json.dumps(builds))
    return cf_index, cr_index, builds


def start_servers(ckpt: Path, hf: Path, cf_index: Path, cr_index: Path | None, builds: list[dict], work: Path,
                  args: argparse.Namespace) -> tuple[list[Server], dict[str, str]]:
    servers, unavailable = [start_clipforge(ckpt, cf_index, work, args)], {}
    mine = (["clipforge-bf16"] if args.bf16 else []) + (["clipforge-onnx"] if args.onnx else [])
    for peer in mine + args.peers:
        try:
            if peer == "clipforge-onnx":
                servers.append(start_clipforge(ckpt, cf_index, work, args, onnx=export_onnx(ckpt, CACHE / "vit-b-32-onnx")))
            elif peer == "clipforge-bf16":
                bf16_index = clipforge_index_dir(work, "bf16")
                if not bf16_index.is_dir():
                    raise RuntimeError(f"no bf16 index at {bf16_index}: rerun without --skip-build")
                servers.append(start_clipforge(ckpt, bf16_index, work, args, precision="bf16"))
            elif peer == "infinity":
                servers.append(start_infinity(hf, work, args))
            elif peer == "infinity-int8":
                servers.append(start_infinity(hf, work, args, dtype="int8"))
            elif peer == "clip-retrieval":
                if cr_index is None:
                    raise RuntimeError(next(b["error"] for b in builds if b["tool"] == "clip-retrieval inference"))
                servers.append(start_clip_back(hf, cr_index, work, args))
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            unavailable[peer] = str(exc)
            print(f"{peer}: NOT RUN: {exc}", flush=True)
    return servers, unavailable


def main() -> int:
    args = parse_args()
    load_before, started = load_average(), time.perf_counter()
    work = CACHE / "run"
    if not args.skip_build:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    images_dir = image_folder(work, args.limit_images)

    hf = CACHE / "vit-b-32-hf"
    ckpt = import_checkpoint(hf, CACHE / "vit-b-32-clipforge", rebuild=build_hf_folder(hf))
    image_files = sorted(images_dir.glob("*.jpg"))
    agree = {"transformers_vs_clipforge": agreement(
        hf, ckpt, [caption(i) for i in range(8)] + ["A child in a pink dress is climbing stairs."], image_files[:8])}
    print(f"same weights, transformers vs clipforge: {agree['transformers_vs_clipforge']}", flush=True)
    check_agreement(agree["transformers_vs_clipforge"])

    cf_index, cr_index, builds = build_indexes(ckpt, hf, images_dir, work, args)
    if cr_index is not None:
        agree["clip_retrieval_index_vs_clipforge"] = clip_retrieval_agreement(ckpt, work)
        print(f"same weights, clip-retrieval's index vectors vs clipforge: {agree['clip_retrieval_index_vs_clipforge']}",
              flush=True)
        check_agreement(agree["clip_retrieval_index_vs_clipforge"])

    servers, unavailable = start_servers(ckpt, hf, cf_index, cr_index, builds, work, args)
    try:
        images = [p.read_bytes() for p in image_files]
        for s in servers:  # warm-up, not measured
            for build in REQUESTS[s.name].values():
                run_drive(s.port, [build(-1 - i, images[i], s.host) for i in range(8)], 4, args.round_timeout)
        by = {s.name: s for s in servers}
        for mine in (name for name in by if name.startswith("clipforge")):
            if "infinity" in by:
                key = f"{mine}_vs_infinity_http".replace("-", "_")
                agree[key] = infinity_agreement(by[mine], by["infinity"], images)
                print(f"same weights over HTTP, {mine} vs infinity: {agree[key]}", flush=True)
                check_agreement(agree[key])
            if "clip-retrieval" in by:
                key = f"{mine}_vs_clip_retrieval_search".replace("-", "_")
                agree[key] = search_agreement(by[mine], by["clip-retrieval"], clip_retrieval_paths(work))
                print(f"same answers, {mine} vs clip-retrieval search: {agree[key]}", flush=True)
        if "clipforge" in by and "infinity-int8" in by:  # recorded, not checked: int8 quantisation moves the vectors
            agree["clipforge_vs_infinity_int8_http"] = infinity_agreement(by["clipforge"], by["infinity-int8"], images)
            print(f"fp32 clipforge vs infinity --dtype int8 over HTTP: {agree['clipforge_vs_infinity_int8_http']}",
                  flush=True)
        load_start = load_average()
        rows = measure(servers, images, args)
        load_end = load_average()
    finally:
        for s in servers:
            stop(s)

    met = [g for s in servers if s.name.startswith("clipforge") for g in goals(rows, builds, args.concurrency, me=s.name)]
    print_report(rows, builds, met, unavailable)
    errors = sum(r["errors"] for r in rows)
    result = {
        "weights": {"shape": "OpenAI ViT-B/32 (openai/clip-vit-base-patch32 config), random weights",
                    "hf_folder": str(hf.relative_to(ROOT)), "clipforge_checkpoint": str(ckpt.relative_to(ROOT)),
                    "agreement": agree},
        "servers": {s.name: {"version": s.version, **s.extra} for s in servers},
        "unavailable": unavailable, "rows": rows, "index_build": builds,
        "index_build_reused_from_an_earlier_run": bool(args.skip_build), "goals": met, "images": len(image_files),
        "threads": args.threads, "workers": args.workers, "rounds": args.rounds, "k": K,
        "load_average": {"before": load_before, "measurement_start": load_start, "measurement_end": load_end,
                         "end": load_average()},
        "wall_s": round(time.perf_counter() - started, 1), "errors": errors,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {args.out} ({errors} errors, {result['wall_s']} s, load average {result['load_average']})")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
