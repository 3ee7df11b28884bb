"""The five parts of bench/gpu_check.py, one process each: `gpu_parts.py PART --result F --work D --seconds S`.

A part is a list of steps, each timed and allowed to fail without stopping the next; the
result file ({"status", "reason", "summary", "results"}) is rewritten after every step, so
the driver keeps what was measured even when it stops the part at its budget. Timing code
comes from bench/model_bench.py (batches, the timed loop, MFU) and the training step from
training/step.py, so these figures mean what theirs mean.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.fileio import write_atomic  # noqa: E402 - after the path set-up

MARGIN_S = 8.0  # a part plans to end this long before the driver would stop it
SWEEP = (256, 512, 1024, 2048, 4096)  # training batches tried, up to the first that does not fit
COMPILE_ESTIMATE_S = 60.0  # a first compiled step of base or thinkclip, forward and backward
E2E_RESERVE_S = 55.0  # of the e2e budget, kept for index build, serve and the requests
E2E_STARTUP_S = 55.0  # of the e2e budget, for the trainer's start-up, data generation, final evaluation and slack
HTTP_TIMEOUT_S = 60.0


class Part:
    """A part's record: its steps, results and verdict, written to the result file after each change."""

    def __init__(self, name: str, result: Path, work: Path, seconds: float) -> None:
        self.name, self.result, self.work = name, result, work
        self.deadline = time.monotonic() + seconds - MARGIN_S
        self.results: dict[str, Any] = {"steps": [], "table": []}
        self.summary = ""
        self.reason = "started"
        work.mkdir(parents=True, exist_ok=True)
        self.save("running")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, status: str = "running") -> None:
        payload = {"status": status, "reason": self.reason, "summary": self.summary, "results": self.results}
        write_atomic(self.result, json.dumps(payload, indent=2, default=str))

    def step(self, label: str, fn: Callable[[], Any], needs_s: float = 0.0) -> Any:
        """Run one step; a failure is recorded, not raised; with less than needs_s left it is skipped."""
        record: dict[str, Any] = {"step": label}
        self.results["steps"].append(record)
        if self.left() < needs_s:
            record.update(status="skipped", reason=f"needs about {needs_s:.0f} s, {max(0, self.left()):.0f} s left")
            self.save()
            return None
        self.reason = f"in step {label}"
        self.save()
        print(f"--- {label}", flush=True)
        start = time.monotonic()
        try:
            value = fn()
            record["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one step's failure must not stop the others
            traceback.print_exc()
            record.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:400]}")
            value = None
        record["seconds"] = round(time.monotonic() - start, 1)
        self.save()
        return value

    def skip(self, label: str, reason: str) -> None:
        self.results["steps"].append({"step": label, "status": "skipped", "reason": reason})
        self.save()

    def row(self, text: str) -> None:
        """A line of the printed table (the headline figures)."""
        self.results["table"].append(text)
        print(text, flush=True)
        self.save()

    def finish(self) -> None:
        failed = [s for s in self.results["steps"] if s["status"] == "failed"]
        self.reason = "; ".join(f"{s['step']}: {s['reason']}" for s in failed)[:600]
        self.save("failed" if failed else "ok")


# --------------------------------------------------------------------------- 1 environment
# pyproject's runtime packages by import name; optuna is imported by `clipforge tune` alone.
IMPORTS = {"torch": "torch", "numpy": "numpy", "pillow": "PIL", "tokenizers": "tokenizers",
           "safetensors": "safetensors", "pydantic": "pydantic", "pydantic-settings": "pydantic_settings",
           "tqdm": "tqdm", "faiss-cpu": "faiss", "fastapi": "fastapi", "uvicorn": "uvicorn",
           "python-multipart": "python_multipart", "httpx": "httpx", "prometheus-client": "prometheus_client",
           "tensorboard": "tensorboard", "optuna": "optuna", "matplotlib": "matplotlib", "pyarrow": "pyarrow",
           "filelock": "filelock", "pytest": "pytest", "open-clip-torch": "open_clip"}
NOT_NEEDED_HERE = {"optuna": "only clipforge tune imports it",
                   "open-clip-torch": "optional: the rival in the throughput part"}


def _requirements() -> dict[str, str]:
    """pyproject's runtime dependencies, name -> specifier."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    return {str(Requirement(d).name): str(Requirement(d).specifier) for d in deps}


def _package(dist: str, module: str, spec: str) -> dict[str, Any]:
    import importlib

    row: dict[str, Any] = {"wanted": spec or "any"}
    try:
        mod = importlib.import_module(module)
        row["version"] = metadata.version(dist) if _has_dist(dist) else getattr(mod, "__version__", "?")
        row["from"] = str(Path(getattr(mod, "__file__", "") or "").parent)
    except Exception as exc:  # noqa: BLE001 - a broken install is reported like a missing one
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return row
    if spec:
        from packaging.specifiers import SpecifierSet

        row["satisfies"] = SpecifierSet(spec).contains(row["version"], prereleases=True)
    return row


def _has_dist(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def _nvidia_smi() -> dict[str, str]:
    fields = "name,driver_version,memory.total,clocks.max.sm,power.limit,persistence_mode"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30, check=True).stdout.strip().splitlines()[0]
    return dict(zip(fields.split(","), (v.strip() for v in out.split(",")), strict=True))


def part_env(part: Part) -> None:
    import torch

    from model.clip import peak_flops

    r = part.results
    r.update(python=sys.version.split()[0], executable=sys.executable, cpus=os.cpu_count(), torch=torch.__version__,
             torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
             cuda_available=torch.cuda.is_available(), device_count=torch.cuda.device_count())
    if shutil.which("nvidia-smi"):
        r["nvidia_smi"] = part.step("nvidia-smi", _nvidia_smi)
    else:
        part.skip("nvidia-smi", "not on the PATH")
    if r["cuda_available"]:
        def gpu() -> dict[str, Any]:
            device = torch.device("cuda", 0)
            props = torch.cuda.get_device_properties(device)
            table_peak = peak_flops(device)
            return {"gpu_name": props.name, "capability": f"{props.major}.{props.minor}",
                    "multiprocessors": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                    "bf16": torch.cuda.is_bf16_supported(),
                    "table_bf16_peak_tflops": table_peak / 1e12 if table_peak else None}

        r.update(part.step("gpu properties", gpu) or {})
    else:
        part.results["steps"].append({"step": "cuda", "status": "failed",
                                      "reason": "torch sees no CUDA GPU (torch.cuda.is_available() is False)"})

    def packages() -> dict[str, Any]:
        specs = _requirements()
        rows = {dist: _package(dist, module, specs.get(dist, "")) for dist, module in IMPORTS.items()}
        missing = [d for d, row in rows.items() if "error" in row and d not in NOT_NEEDED_HERE]
        if missing:
            raise RuntimeError(f"cannot import {', '.join(missing)}: bring their wheels (bench/gpu_wheels.sh)")
        return rows

    r["packages"] = part.step("packages", packages)
    if r["packages"] is None:  # the step failed: list them all the same
        specs = _requirements()
        r["packages"] = {dist: _package(dist, module, specs.get(dist, "")) for dist, module in IMPORTS.items()}
    unmet = [f"{d} {row['version']} (pyproject {row['wanted']})" for d, row in r["packages"].items()
             if row.get("satisfies") is False]
    absent = [f"{d} ({NOT_NEEDED_HERE.get(d, 'missing')})" for d, row in r["packages"].items() if "error" in row]
    gpu_text = (f"{r.get('gpu_name')}, sm_{r.get('capability', '?').replace('.', '')}, {r.get('memory_gib')} GiB, "
                f"bf16 {'yes' if r.get('bf16') else 'no'}" if r["cuda_available"] else "no CUDA GPU")
    driver = (r.get("nvidia_smi") or {}).get("driver_version", "?")
    part.summary = (f"{gpu_text}; driver {driver}; torch {r['torch']} (CUDA {r['torch_cuda']}); python {r['python']}"
                    + (f"; not importable: {', '.join(absent)}" if absent else ""))
    if unmet:
        part.row("versions other than pyproject's (the machine's own are used): " + ", ".join(unmet))


# --------------------------------------------------------------------------- 2 the gpu tests
def gpu_test_files() -> list[Path]:
    return [p for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text(encoding="utf-8")]


def _junit_counts(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    problems, skips = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        for tag in ("failure", "error"):
            for node in case.findall(tag):
                problems.append(f"{name}: {(node.get('message') or '')[:300]}")
        for node in case.findall("skipped"):
            skips.append(f"{name}: {(node.get('message') or '')[:200]}")
    counts["problems"], counts["skips"] = problems, skips
    return counts


def part_tests(part: Part) -> None:
    files = gpu_test_files()
    part.results["files"] = [str(p.relative_to(ROOT)) for p in files]
    if not files:
        part.results["steps"].append({"step": "pytest", "status": "failed",
                                      "reason": "no test file carries the gpu marker"})
        return
    junit = part.work / "junit.xml"

    def pytest() -> dict[str, Any]:
        per_test = max(30, int(part.left() / 2))
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", f"timeout={per_test}", *map(str, files)]
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, timeout=max(10.0, part.left()), check=False)
        counts = _junit_counts(junit)
        counts["exit_code"] = proc.returncode
        part.results["pytest"] = counts
        part.summary = (f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                        f"{counts['skipped']} skipped")
        for line in counts["problems"] + counts["skips"]:
            part.row(line)
        if counts["failures"] or counts["errors"] or proc.returncode not in (0, 5):
            raise RuntimeError(f"pytest exited with {proc.returncode}: " + "; ".join(counts["problems"])[:300])
        if counts["passed"] == 0:
            raise RuntimeError("no gpu test ran: " + "; ".join(counts["skips"])[:300])
        return counts

    part.step("pytest", pytest)


# --------------------------------------------------------------------------- 3 training throughput
def _free_cuda() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def measure_bf16_peak(n: int = 8192, reps: int = 10) -> dict[str, float]:
    """The chip's dense bf16 matmul rate on random data (CUDA events, median of reps after warm-up)."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    _free_cuda()
    flops = 2 * n**3
    return {"median_flops": flops / statistics.median(times), "best_flops": flops / min(times), "n": n, "reps": reps}


def _trainer_step_class() -> type:
    """model_bench's Ours with the trainer's forward/backward, optimizer and clipping (compiled as --compile does)."""
    import torch
    from model_bench import Ours

    from training.optim import build_optimizer
    from training.step import ContrastiveModule, forward_backward

    class TrainerStep(Ours):
        def __init__(self, cfg: Any, device: Any, compiled: bool) -> None:
            super().__init__(cfg, device)
            self.opt = build_optimizer(self.model, lr=1e-4, weight_decay=0.1, device=device)
            module = ContrastiveModule(self.model)
            self.module = torch.compile(module) if compiled else module

        def train_step(self, pixels: Any, ids: Any) -> float:
            loss = forward_backward(self.module, pixels, ids)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.model.clamp_logit_scale_()
            return loss

    return TrainerStep


def _timed_rows(impls: list, pixels: Any, ids: Any, warmup: int, iters: int) -> dict[str, list[float]]:
    from model_bench import measure

    return {name: wall for name, (wall, _cpu) in measure(impls, "train", pixels, ids, "bf16", warmup, iters).items()}


def _train_row(label: str, batch: int, wall: list[float], flops_per_sample: float, peaks: dict[str, float | None],
               **extra: Any) -> dict[str, Any]:
    import torch

    best = batch / min(wall)
    row = {"run": label, "batch": batch, "samples_per_s": best, "samples_per_s_median": batch / statistics.median(wall),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, **extra}
    for key, peak in peaks.items():
        row[f"mfu_{key}"] = flops_per_sample * best / peak if peak else None
    return row


def _fmt_train(row: dict[str, Any]) -> str:
    mfu, sheet = row.get("mfu_measured"), row.get("mfu_table")
    text = f"{row['run']:28s} batch {row['batch']:5d}  {row['samples_per_s']:9.0f} samples/s  "
    text += f"MFU {mfu:6.1%}" if mfu is not None else "MFU      -"
    if sheet is not None:
        text += f" ({sheet:.1%} of the datasheet)"
    text += f"  peak {row['peak_mem_gib']:5.1f} GiB"
    if row.get("compile_s") is not None:
        text += f"  first step {row['compile_s']:.0f} s"
    return text


def _flops_per_sample(cfg: Any, ids: Any) -> float:
    """Training FLOPs of one sample, the text tower at the columns it runs (it drops trailing padding)."""
    from model.clip import estimate_image_flops, estimate_text_flops

    seq_len = int((ids != cfg.pad_token_id).sum(dim=1).max())
    return 3 * (estimate_image_flops(cfg) + estimate_text_flops(cfg, seq_len))


def _sweep(part: Part, preset: str, cfg: Any, pixels: Any, ids: Any, peaks: dict) -> int | None:
    """Eager bf16 steps at growing batches up to the first that does not fit; the largest that fit."""
    import torch

    TrainerStep = _trainer_step_class()
    impl = TrainerStep(cfg, torch.device("cuda"), compiled=False)
    fit, step_s = None, 1.0
    for batch in SWEEP:
        if part.left() < step_s * 2 * 6 + COMPILE_ESTIMATE_S:
            part.row(f"{preset} eager: sweep stopped before batch {batch} to leave time for compile")
            break
        px, tx = pixels[:batch], ids[:batch]
        torch.cuda.reset_peak_memory_stats()
        try:
            wall = _timed_rows([impl], px, tx, warmup=2, iters=4)["clipforge"]
        except torch.cuda.OutOfMemoryError:
            impl.opt.zero_grad(set_to_none=True)
            _free_cuda()
            part.results["train_rows"].append({"run": f"{preset} eager", "batch": batch, "oom": True})
            part.row(f"{preset + ' eager':28s} batch {batch:5d}  out of memory: the sweep stops here")
            break
        row = _train_row(f"{preset} eager", batch, wall, _flops_per_sample(cfg, tx), peaks)
        part.results["train_rows"].append(row)
        part.row(_fmt_train(row))
        fit, step_s = batch, statistics.median(wall) * 2
    del impl
    _free_cuda()
    return fit


def _fixed_batch(part: Part, label: str, make: Callable[[], Any], pixels: Any, ids: Any, peaks: dict,
                 flops_per_sample: float) -> None:
    """One model at a fixed batch: the first step timed apart (it holds any compilation), then the rest."""
    import torch

    batch = pixels.shape[0]
    impl = make()
    torch.cuda.reset_peak_memory_stats()
    try:
        first = _timed_rows([impl], pixels, ids, warmup=0, iters=1)[impl.name][0]
        wall = _timed_rows([impl], pixels, ids, warmup=2, iters=5)[impl.name]
    except torch.cuda.OutOfMemoryError:
        del impl
        _free_cuda()
        part.results["train_rows"].append({"run": label, "batch": batch, "oom": True})
        raise RuntimeError(f"{label}: out of memory at batch {batch}") from None
    row = _train_row(label, batch, wall, flops_per_sample, peaks, compile_s=first)
    part.results["train_rows"].append(row)
    part.row(_fmt_train(row))
    del impl
    _free_cuda()


def part_train(part: Part) -> None:
    """In order of what matters most when time runs short: base eager and compiled, thinkclip eager,
    open_clip eager beside base, thinkclip compiled, open_clip compiled."""
    import torch
    import model_bench
    from model_bench import OpenCLIP, bench_config, make_batch

    from model.clip import estimate_image_flops, estimate_text_flops, peak_flops

    device = torch.device("cuda")
    part.results["train_rows"] = []
    measured = part.step("bf16 matmul peak", measure_bf16_peak) or {}
    part.results["bf16_peak"] = measured
    peaks = {"measured": measured.get("median_flops"), "table": peak_flops(device)}
    if peaks["measured"]:
        sheet = f"{peaks['table'] / 1e12:.0f}" if peaks["table"] else "unknown"
        part.row(f"bf16 matmul {measured['n']}^3: {peaks['measured'] / 1e12:.0f} TFLOP/s measured (median of "
                 f"{measured['reps']}), datasheet {sheet}; MFU below is against the measured rate")
    TrainerStep = _trainer_step_class()
    configs = {preset: bench_config(preset, 224, mha=False) for preset in ("base", "thinkclip")}
    chosen: dict[str, int] = {}
    part.results["chosen_batch"] = chosen

    def sweep(preset: str) -> None:
        def run() -> int | None:
            torch.manual_seed(0)
            pixels, ids = (t.to(device) for t in make_batch(configs[preset], max(SWEEP)))
            return _sweep(part, preset, configs[preset], pixels, ids, peaks)

        fit = part.step(f"{preset} eager sweep", run, needs_s=20)
        _free_cuda()  # the sweep's batch went with run()
        if fit:
            chosen[preset] = fit

    def compiled(preset: str) -> None:
        if preset not in chosen:
            part.skip(f"{preset} compiled", "the eager sweep found no batch that fits")
            return
        cfg = configs[preset]
        pixels, ids = (t.to(device) for t in make_batch(cfg, chosen[preset]))
        part.step(f"{preset} compiled", lambda: _fixed_batch(
            part, f"{preset} compiled", lambda: TrainerStep(cfg, device, compiled=True), pixels, ids, peaks,
            _flops_per_sample(cfg, ids)), needs_s=COMPILE_ESTIMATE_S)

    def rival(compile_it: bool) -> None:
        label = f"open_clip base {'compiled' if compile_it else 'eager'}"
        if model_bench.open_clip is None:
            part.skip(label, "open_clip does not import here (bring the open-clip-torch, ftfy and wcwidth wheels)")
            return
        if "base" not in chosen:
            part.skip(label, "no base batch was measured to compare at")
            return
        cfg = configs["base"]
        mha = cfg.replace(text_n_kv_heads=cfg.text_n_heads)  # open_clip's text tower: full heads, full context
        flops = 3 * (estimate_image_flops(mha) + estimate_text_flops(mha))
        pixels, ids = (t.to(device) for t in make_batch(cfg, chosen["base"]))

        def make() -> Any:
            impl = OpenCLIP(cfg, device)
            if compile_it:
                impl.model.encode_image = torch.compile(impl.model.encode_image)
                impl.model.encode_text = torch.compile(impl.model.encode_text)
            return impl

        part.results["open_clip"] = model_bench.open_clip.__version__
        part.step(label, lambda: _fixed_batch(part, label, make, pixels, ids, peaks, flops),
                  needs_s=COMPILE_ESTIMATE_S if compile_it else 20)

    sweep("base")
    compiled("base")
    sweep("thinkclip")
    rival(compile_it=False)
    compiled("thinkclip")
    rival(compile_it=True)
    part.summary = _train_headline(part.results["train_rows"], chosen) or "nothing measured"


def _train_headline(rows: list[dict[str, Any]], chosen: dict[str, int]) -> str:
    """Each run at the batch the comparison was made at (the eager sweep's largest that fit)."""
    bits = []
    for row in rows:
        preset = "base" if row["run"].startswith("open_clip") else row["run"].split()[0]
        if row.get("oom") or row["batch"] != chosen.get(preset):
            continue
        mfu = row.get("mfu_measured")
        bits.append(f"{row['run']} b{row['batch']} {row['samples_per_s']:.0f}/s" + (f" MFU {mfu:.1%}" if mfu else ""))
    return "; ".join(bits)


# --------------------------------------------------------------------------- 4 train, index, serve
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_logged(cmd: list[str], timeout: float) -> None:
    """A clipforge command with its output in this part's log; a failure or overrun raises a one-line error."""
    print("$ " + " ".join(cmd), flush=True)
    what = " ".join(cmd[3:5])
    try:
        result = subprocess.run(cmd, cwd=ROOT, timeout=max(5.0, timeout), check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"clipforge {what} ran past {timeout:.0f} s and was stopped") from None
    if result.returncode != 0:
        raise RuntimeError(f"clipforge {what} exited with code {result.returncode} (see the log)")


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
    part.step("clipforge train", lambda: _run_logged(cmd, part.left() - E2E_RESERVE_S))
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
    part.step("clipforge index build", lambda: (_run_logged(build, part.left()), _run_logged(add, part.left())))
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


# --------------------------------------------------------------------------- 5 encode throughput
def _model_import_available() -> bool:
    """Whether `clipforge model import` exists (asked through the CLI itself, as a user would)."""
    probe = subprocess.run([sys.executable, "-m", "clipforge_cli", "model", "import", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, check=False)
    return probe.returncode == 0


def _import_vit_b_32(part: Part) -> Path:
    """open_clip's ViT-B-32 with random weights, saved as a bare state dict and imported by `clipforge model import`."""
    import open_clip
    import torch

    from app.demo import _clipforge

    src, out = part.work / "vit-b-32-random.pt", part.work / "vit-b-32-imported"
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), src)
    shutil.rmtree(out, ignore_errors=True)
    _run_logged(_clipforge("model", "import", f"open_clip:{src}", "--arch", "ViT-B-32", "--out", str(out)),
                part.left() - 15)
    return out


def part_encode(part: Part) -> None:
    import torch
    import model_bench
    from model_bench import Ours, bench_config, make_batch, measure

    from model import load_checkpoint, preset_config

    device = torch.device("cuda")
    part.results["encode_rows"] = []

    def encode(name: str, impl: Any) -> None:
        pixels, ids = (t.to(device) for t in make_batch(impl.model.cfg, 256))
        for batch, warmup, iters in ((1, 10, 30), (256, 3, 10)):
            for op, unit in (("image", "images/s"), ("text", "texts/s")):
                wall = measure([impl], op, pixels[:batch], ids[:batch], "bf16", warmup, iters)["clipforge"][0]
                row = {"model": name, "op": op, "batch": batch, "per_s": batch / min(wall),
                       "per_s_median": batch / statistics.median(wall)}
                part.results["encode_rows"].append(row)
                part.row(f"{name:17s} {op:5s} batch {batch:3d}  {row['per_s']:9.0f} {unit} "
                         f"(median {row['per_s_median']:.0f})")
        del impl
        _free_cuda()

    def preset(cfg: Any) -> Any:
        torch.manual_seed(0)
        return Ours(cfg, device)

    part.step("base encode", lambda: encode("base", preset(bench_config("base", 224, mha=False))), needs_s=5)
    # OpenAI ViT-B/32's shape from the vit-b-16 preset, for when the import below cannot run
    part.step("vit-b-32 size encode", lambda: encode("vit-b-32 size", preset(preset_config("vit-b-16", patch_size=32))),
              needs_s=5)
    if not _model_import_available():
        part.skip("imported vit-b-32", "`clipforge model import` is not there yet")
    elif model_bench.open_clip is None:
        part.skip("imported vit-b-32", "open_clip does not import here, and it makes the ViT-B-32 state dict to import")
    else:
        ckpt = part.step("clipforge model import", lambda: _import_vit_b_32(part), needs_s=25)
        if ckpt is not None:
            def imported() -> Any:
                model, _, _ = load_checkpoint(ckpt, device=device)
                impl = Ours(model.cfg, device)
                impl.model = model
                return impl

            part.step("imported vit-b-32 encode", lambda: encode("imported vit-b-32", imported()), needs_s=5)
    rows = part.results["encode_rows"]
    part.summary = "; ".join(f"{r['model']} {r['op']} b{r['batch']} {r['per_s']:.0f}/s" for r in rows
                             if r["model"] == "base") or "nothing measured"


PART_FUNCTIONS: dict[str, Callable[[Part], None]] = {
    "env": part_env, "tests": part_tests, "train": part_train, "e2e": part_e2e, "encode": part_encode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=list(PART_FUNCTIONS))
    parser.add_argument("--result", type=Path, required=True, help="JSON file this part writes as it goes")
    parser.add_argument("--work", type=Path, required=True, help="folder for its artefacts")
    parser.add_argument("--seconds", type=float, required=True, help="its budget (the driver stops it then)")
    args = parser.parse_args(argv)
    part = Part(args.part, args.result, args.work, args.seconds)
    try:
        PART_FUNCTIONS[args.part](part)
    except Exception as exc:  # noqa: BLE001 - an error outside any step still ends in a result file
        traceback.print_exc()
        part.results["steps"].append({"step": "part", "status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
    part.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
