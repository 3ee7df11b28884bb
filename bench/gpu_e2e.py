"""Part 4 of the GPU check: `clipforge train` on cuda in bf16 with --compile, `index build
--device cuda`, and `serve --device cuda` answering /classify and /search (the demo's recipe)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from gpu_steps import ROOT, Part, run_logged

E2E_RESERVE_S = 55.0  # of the e2e budget, kept for index build, serve and the requests
E2E_STARTUP_S = 55.0  # of the e2e budget, for the trainer's start-up, data generation, final evaluation and slack
HTTP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _train_summary(run: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    if not train:
        raise RuntimeError("the run logged no training step")
    steady = train[1:] or train  # the first window holds the compilation
    out: dict[str, Any] = {"steps": train[-1]["step"], "elapsed_s": train[-1]["elapsed_s"],
                           "last_loss": train[-1]["loss"],
                           "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
                           "device": next((r.get("device") for r in records if r["kind"] == "run"), None)}
    if all("mfu" in r for r in steady):
        out["mfu_datasheet"] = statistics.median(r["mfu"] for r in steady)
    if val:
        out["zeroshot_top1_heldout"] = max((r.get("zeroshot_top1", float("nan")) for r in val), default=None)
        out["val_loss"] = val[-1].get("val_loss")
    return out


def _serve_checks(part: Part, url: str, checkpoint: Path, shapes: Path) -> dict[str, Any]:
    """/info, /classify on held-out images (against the CPU inference of the same checkpoint), /search."""
    import httpx
    import numpy as np

    from model import CLIPInference
    from training.data.shapes import CLASS_NAMES, load_shapes_split

    records = load_shapes_split(shapes, "heldout")[:12]
    cpu = CLIPInference.load(checkpoint, device="cpu")
    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as client:
        info = client.get("/info")
        info.raise_for_status()
        out["info"] = info.json()
        correct, latencies, diffs = 0, [], []
        for rec in records:
            image = Path(rec.image)
            start = time.monotonic()
            response = client.post("/classify", files={"image": (image.name, image.read_bytes(), "image/png")})
            latencies.append(time.monotonic() - start)
            if response.status_code != 200:
                raise RuntimeError(f"/classify answered {response.status_code}: {response.text[:300]}")
            preds = response.json()["predictions"]
            correct += preds[0]["label"] == CLASS_NAMES[rec.label]
            served = {p["label"]: p["probability"] for p in preds}
            local = {p["label"]: p["probability"] for p in cpu.classify(str(image), list(served))}
            diffs.append(max(abs(served[k] - local[k]) for k in served))
        out["classify"] = {"images": len(records), "top1_correct": correct, "median_latency_ms":
                           1e3 * statistics.median(latencies), "max_abs_prob_diff_vs_cpu": float(np.max(diffs))}
        response = client.get("/search", params={"q": "a red circle", "k": 5})
        if response.status_code != 200:
            raise RuntimeError(f"/search answered {response.status_code}: {response.text[:300]}")
        hits = response.json()["results"]
        if not hits:
            raise RuntimeError("/search returned no results from a non-empty index")
        out["search"] = {"hits": len(hits),
                         "top": [{k: h.get(k) for k in ("path", "caption", "score")} for h in hits]}
    c = out["classify"]
    part.row(f"/classify on {c['images']} held-out images: {c['top1_correct']} right, median "
             f"{c['median_latency_ms']:.0f} ms, largest probability difference to the CPU "
             f"{c['max_abs_prob_diff_vs_cpu']:.1e}")
    part.row(f"/search 'a red circle': {len(hits)} hits, top {hits[0]['path']} (caption {hits[0].get('caption')!r}, "
             f"score {hits[0]['score']:.3f})")
    return out


def _serve(part: Part, checkpoint: Path, index: Path, shapes: Path) -> dict[str, Any]:
    from app.demo import _clipforge, _wait_ready

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = _clipforge("serve", "--checkpoint", str(checkpoint), "--index", str(index), "--device", "cuda",
                     "--host", "127.0.0.1", "--port", str(port))
    print("$ " + " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, cwd=ROOT)  # in this part's process group: stopped with it if need be
    try:
        start = time.monotonic()
        _wait_ready(url, server, max(10.0, min(120.0, part.left() - 15)))
        part.results["serve_ready_s"] = round(time.monotonic() - start, 1)
        return _serve_checks(part, url, checkpoint, shapes)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)  # uvicorn drains on the first SIGINT
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def part_e2e(part: Part) -> None:
    from app.demo import DemoLayout, _clipforge, index_commands, train_command

    layout = DemoLayout(part.work)
    for stale in (layout.run, layout.index):  # an earlier check's, with the same --work (the shapes are kept)
        shutil.rmtree(stale, ignore_errors=True)
    minutes = max(0.5, (part.left() - E2E_RESERVE_S - E2E_STARTUP_S) / 60)
    workers = str(max(1, min(8, (os.cpu_count() or 2) - 2)))
    # The demo's recipe with the CUDA path's flags appended: for a repeated flag the last one counts.
    cmd = train_command(layout, minutes, None) + [
        "--device", "cuda", "--precision", "bf16", "--compile", "--num-workers", workers, "--epochs", "100",
        "--max-minutes", f"{minutes:.2f}", "--no-plots", "--no-progress", "--log-every", "20"]
    part.results["train_minutes"] = round(minutes, 2)
    part.step("clipforge train", lambda: run_logged(cmd, part.left() - E2E_RESERVE_S))
    if (layout.run / "metrics.jsonl").is_file():
        summary = part.step("training metrics", lambda: _train_summary(layout.run))
        part.results["train"] = summary
        if summary:
            mfu = summary.get("mfu_datasheet")
            part.row(f"train shapes-64 on {summary.get('device')}: {summary['steps']} steps in "
                     f"{summary.get('elapsed_s', 0):.0f} s, {summary.get('samples_per_s', 0):.0f} samples/s"
                     + (f", MFU {mfu:.1%} of the datasheet" if mfu is not None else "")
                     + f", best held-out zero-shot top-1 {summary.get('zeroshot_top1_heldout') or float('nan'):.3f}")
    if not (layout.checkpoint / "meta.json").is_file():
        part.skip("clipforge index build", "training left no best/ checkpoint")
        part.skip("clipforge serve", "training left no best/ checkpoint")
        return
    build, add = (c + ["--device", "cuda", "--quiet"] for c in index_commands(layout))
    part.step("clipforge index build", lambda: (run_logged(build, part.left()), run_logged(add, part.left())))
    info = _clipforge("index", "info", str(layout.index), "--json")
    if (layout.index / "manifest.json").exists() or layout.index.is_dir():
        part.results["index"] = part.step("index info", lambda: json.loads(subprocess.run(
            info, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout))
    part.results["serve"] = part.step("clipforge serve", lambda: _serve(part, layout.checkpoint, layout.index,
                                                                         layout.shapes), needs_s=20)
    train = part.results.get("train") or {}
    serve = part.results.get("serve") or {}
    part.summary = (f"trained {train.get('steps', 0)} steps at {train.get('samples_per_s', 0):.0f} samples/s; "
                    f"index {(part.results.get('index') or {}).get('count', '?')} images; "
                    + (f"/classify {serve['classify']['top1_correct']}/{serve['classify']['images']} right, "
                       f"/search {serve['search']['hits']} hits" if serve else "serve checks did not finish"))

