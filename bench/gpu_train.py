"""Part 3 of the GPU check, training throughput: samples/s, MFU and peak memory for base and
thinkclip, eager and compiled, at the largest batch of a short sweep (open_clip beside them).

Timing code comes from bench/model_bench.py (batches, the timed loop, MFU) and the training
step from training/step.py, so these figures mean what theirs mean.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from gpu_steps import Part, free_cuda

SWEEP = (256, 512, 1024, 2048, 4096)  # training batches tried, up to the first that does not fit
COMPILE_ESTIMATE_S = 60.0  # a first compiled step of base or thinkclip, forward and backward


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
    free_cuda()
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
            free_cuda()
            part.results["train_rows"].append({"run": f"{preset} eager", "batch": batch, "oom": True})
            part.row(f"{preset + ' eager':28s} batch {batch:5d}  out of memory: the sweep stops here")
            break
        row = _train_row(f"{preset} eager", batch, wall, _flops_per_sample(cfg, tx), peaks)
        part.results["train_rows"].append(row)
        part.row(_fmt_train(row))
        fit, step_s = batch, statistics.median(wall) * 2
    del impl
    free_cuda()
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
        free_cuda()
        part.results["train_rows"].append({"run": label, "batch": batch, "oom": True})
        raise RuntimeError(f"{label}: out of memory at batch {batch}") from None
    row = _train_row(label, batch, wall, flops_per_sample, peaks, compile_s=first)
    part.results["train_rows"].append(row)
    part.row(_fmt_train(row))
    del impl
    free_cuda()


def part_train(part: Part) -> None:
    """In order of what matters most when time runs short: base eager and compiled, thinkclip eager,
    open_clip eager beside base, thinkclip compiled, open_clip compiled."""
    import model_bench
    import torch
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
        free_cuda()  # the sweep's batch went with run()
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

