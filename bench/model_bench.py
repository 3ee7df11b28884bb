"""Model throughput on this machine: encode (images/s, texts/s) and training step (samples/s).

    python bench/model_bench.py                          # tiny + small, 32 and 224 px, fp32 + bf16
    python bench/model_bench.py --presets tiny --sizes 32 --iters 10 --warmup 3
    python bench/model_bench.py --device cuda            # base + thinkclip at 224 px on the GPU, with MFU

Training step = both towers forward + contrastive loss + backward + AdamW step. When
`open_clip` is importable (it needs torchvision, so run this with an interpreter that has
it), open_clip's CLIP of the same widths, depths, heads, image size, patch size, context
length and vocab is timed in the same process, interleaved round by round with ours so a
shared, noisy machine slows both alike, and the table shows our/their ratios.

Each figure is the best of the timed iterations (the least disturbed by other jobs), as
samples per CPU-second of this process (steady on a shared machine; equal to wall-clock
throughput on an idle one with --threads 1) and as wall-clock samples/s; the JSON keeps
medians too. Captions are 8-24 tokens padded to the context length, as real batches are
(our text tower skips the padding columns; --full-captions fills the whole context).
Prints a table and writes bench/results/model_bench.json (rewritten after every row).

--device cuda runs on the GPU (bf16 = autocast to bfloat16 there too), synchronising
around every timed call so wall clock covers the kernels; there the wall-clock figures
are the throughput (per CPU-second only shows host overhead). Training rows carry an MFU
column: model FLOPs utilisation of the best wall-clock step against the GPU's dense bf16
peak (or --peak-tflops, which also gives CPU rows one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import CLIP, PRESETS, CLIPConfig, clip_loss, preset_config
from model.clip import peak_flops

try:  # optional rival, timed only where it is installed
    import open_clip  # type: ignore[import-not-found]
    from open_clip.loss import ClipLoss  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure just means "not measured"
    open_clip = None


# --------------------------------------------------------------------------- inputs
def bench_config(preset: str, size: int, mha: bool) -> CLIPConfig:
    """A preset at a benchmark image size: patch 4 at 32 px (64 patches), patch 16 at 224 px (196)."""
    patch = 4 if size <= 64 else 16
    cfg = preset_config(preset, img_size=size, patch_size=patch)
    return cfg.replace(text_n_kv_heads=cfg.text_n_heads) if mha else cfg


def make_batch(cfg: CLIPConfig, batch: int, full: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pixels and captions of 8-24 tokens (typical caption lengths; full: max_seq_len), right-padded."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, cfg.channel, cfg.img_size, cfg.img_size, generator=gen)
    ids = torch.full((batch, cfg.max_seq_len), cfg.pad_token_id, dtype=torch.long)
    low, high = (cfg.max_seq_len, cfg.max_seq_len) if full else (8, min(24, cfg.max_seq_len))
    lengths = torch.randint(low, high + 1, (batch,), generator=gen)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0] = cfg.sot_token_id
        ids[i, 1 : n - 1] = torch.randint(3, cfg.vocab_size - 1, (n - 2,), generator=gen)
        ids[i, n - 1] = cfg.eot_token_id
    return pixels, ids


# --------------------------------------------------------------------------- the two implementations
class Impl:
    """One model behind three timed operations."""

    name = ""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor: ...
    def train_step(self, pixels: torch.Tensor, ids: torch.Tensor) -> float: ...


class Ours(Impl):
    name = "clipforge"

    def __init__(self, cfg: CLIPConfig, device: torch.device) -> None:
        self.model = CLIP(cfg).to(device)
        self.opt = torch.optim.AdamW(self.model.param_groups(0.1), lr=1e-4)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids)

    def train_step(self, pixels: torch.Tensor, ids: torch.Tensor) -> float:
        loss = clip_loss(self.model.encode_image(pixels), self.model.encode_text(ids), self.model.scale())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.model.clamp_logit_scale_()
        return float(loss.detach())


class OpenCLIP(Impl):
    name = "open_clip"

    def __init__(self, cfg: CLIPConfig, device: torch.device) -> None:
        vision = open_clip.model.CLIPVisionCfg(
            layers=cfg.img_n_layers, width=cfg.img_dim, head_width=cfg.img_dim // cfg.img_n_heads,
            mlp_ratio=cfg.img_mlp_ratio, patch_size=cfg.patch_size, image_size=cfg.img_size,
        )
        text = open_clip.model.CLIPTextCfg(
            context_length=cfg.max_seq_len, vocab_size=cfg.vocab_size, width=cfg.text_dim,
            heads=cfg.text_n_heads, layers=cfg.text_n_layers, mlp_ratio=cfg.text_mlp_ratio,
        )
        self.model = open_clip.model.CLIP(embed_dim=cfg.align_dim, vision_cfg=vision, text_cfg=text).to(device)
        self.loss = ClipLoss()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids, normalize=True)

    def train_step(self, pixels: torch.Tensor, ids: torch.Tensor) -> float:
        img = self.model.encode_image(pixels, normalize=True)
        txt = self.model.encode_text(ids, normalize=True)
        loss = self.loss(img, txt, self.model.logit_scale.exp())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, 4.6052)
        return float(loss.detach())


# --------------------------------------------------------------------------- timing
def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call; on a GPU, until its kernels finish."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()  # queued work of the previous call must not be billed to this one
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(impls: list[Impl], op: str, pixels: torch.Tensor, ids: torch.Tensor, dtype: str, warmup: int,
            iters: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per-iteration (wall, CPU) seconds for each impl, alternating impls every iteration (fair under load)."""
    def call(impl: Impl) -> Callable[[], object]:
        if op == "train":
            impl.model.train()
            return lambda: impl.train_step(pixels, ids)
        impl.model.eval()
        if op == "image":
            return lambda: impl.encode_image(pixels)
        return lambda: impl.encode_text(ids)

    times: dict[str, tuple[list[float], list[float]]] = {impl.name: ([], []) for impl in impls}
    grad = torch.enable_grad() if op == "train" else torch.inference_mode()
    with grad, autocast(dtype, pixels.device):
        for i in range(warmup + iters):
            order = impls if i % 2 == 0 else impls[::-1]
            for impl in order:
                wall, cpu = timed(call(impl), pixels.device)
                if i >= warmup:
                    times[impl.name][0].append(wall)
                    times[impl.name][1].append(cpu)
    return times


def train_mfu(model: CLIP, ids: torch.Tensor, samples_per_s: float, peak: float | None) -> float | None:
    """MFU of a training step, counting the text columns the tower runs (it drops trailing padding)."""
    if peak is None:
        return None
    seq_len = int((ids != model.cfg.pad_token_id).sum(dim=1).max())
    return model.estimate_mfu(samples_per_s, peak, seq_len)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: time on the GPU (default presets base + thinkclip at 224 px)")
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=None,
                        help="default: tiny small on cpu, base thinkclip on cuda")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="default: 32 224 on cpu, 224 on cuda")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s for the MFU column (default: the GPU's dense bf16 peak if known)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--ops", nargs="+", default=["image", "text", "train"], choices=["image", "text", "train"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)  # training steps settle after ~2 (optimizer state, allocator)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mha", action="store_true", help="text tower with kv heads = heads (no GQA), as open_clip")
    parser.add_argument("--no-open-clip", action="store_true", help="time clipforge only")
    parser.add_argument("--full-captions", action="store_true", help="captions fill the whole context (no padding)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_bench.json")
    parser.add_argument("--show", type=Path, help="only print the table of a saved JSON result")
    args = parser.parse_args(argv)
    if args.show:
        saved = json.loads(args.show.read_text())
        print(f"{saved['command']}  (torch {saved['torch']}, {saved['threads']} threads, batch {saved['batch']})")
        for row in saved["rows"]:
            print(format_row(row, "cpu_ratio" in row))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is "
                     "False); run on a GPU machine or use --device cpu")
    device = torch.device(args.device)
    gpu = args.device == "cuda"
    args.presets = args.presets or (["base", "thinkclip"] if gpu else ["tiny", "small"])
    args.sizes = args.sizes or ([224] if gpu else [32, 224])
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    args.device_name = torch.cuda.get_device_name(device) if gpu else "cpu"
    args.peak_flops = peak

    torch.set_num_threads(args.threads)
    rival = open_clip is not None and not args.no_open_clip
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"open_clip {open_clip.__version__ if rival else 'not measured'}, "
          f"{args.warmup} warm-up + {args.iters} timed iterations, best of them; samples per CPU-second of "
          f"this process (= wall-clock throughput on an idle machine with --threads 1), then wall clock")
    if gpu:
        print(f"device {args.device_name}: the wall-clock figures are the throughput; MFU against "
              f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'an unknown peak (pass --peak-tflops)'}")
    rows = []
    for preset in args.presets:
        for size in args.sizes:
            cfg = bench_config(preset, size, args.mha)
            torch.manual_seed(0)
            impls: list[Impl] = [Ours(cfg, device)]
            if rival:
                impls.append(OpenCLIP(cfg, device))
            pixels, ids = (t.to(device) for t in make_batch(cfg, args.batch, args.full_captions))
            for dtype in args.dtypes:
                for op in args.ops:
                    times = measure(impls, op, pixels, ids, dtype, args.warmup, args.iters)
                    row = {"preset": preset, "img_size": size, "patch_size": cfg.patch_size, "dtype": dtype,
                           "op": op, "batch": args.batch}
                    for name, (wall, cpu) in times.items():
                        row[f"{name}_per_s"] = args.batch / min(wall)
                        row[f"{name}_per_s_median"] = args.batch / statistics.median(wall)
                        row[f"{name}_per_cpu_s"] = args.batch / min(cpu)
                    if rival:
                        row["ratio"] = row["clipforge_per_s"] / row["open_clip_per_s"]
                        row["cpu_ratio"] = row["clipforge_per_cpu_s"] / row["open_clip_per_cpu_s"]
                    if op == "train":
                        row["clipforge_mfu"] = train_mfu(impls[0].model, ids, row["clipforge_per_s"], peak)
                    rows.append(row)
                    print(format_row(row, rival), flush=True)
                    write_result(args, rival, rows)  # after every row: a long run interrupted keeps its rows
    print(f"\nwrote {args.out}")
    return 0


def write_result(args: argparse.Namespace, rival: bool, rows: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": args.device_name, "peak_flops": args.peak_flops,
        "torch": torch.__version__, "threads": args.threads, "batch": args.batch, "warmup": args.warmup,
        "iters": args.iters, "mha": args.mha, "full_captions": args.full_captions,
        "open_clip": open_clip.__version__ if rival else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows,
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)


UNITS = {"image": "images/s", "text": "texts/s", "train": "samples/s"}


def format_row(row: dict, rival: bool) -> str:
    """Samples per CPU-second of this process first (steady under load), then best wall-clock."""
    label = f"{row['preset']:6s} {row['img_size']:3d}px/{row['patch_size']:<2d} {row['dtype']:4s} {row['op']:5s}"
    unit = UNITS[row["op"]]
    text = f"{label}  ours {row['clipforge_per_cpu_s']:8.1f}"
    if rival:
        text += f"  open_clip {row['open_clip_per_cpu_s']:8.1f}  ratio {row['cpu_ratio']:5.2f}x"
    text += f"  {unit:9s} per CPU-s  |  wall: ours {row['clipforge_per_s']:8.1f}"
    if rival:
        text += f"  open_clip {row['open_clip_per_s']:8.1f}  ratio {row['ratio']:5.2f}x"
    if row["op"] == "train":
        mfu = row.get("clipforge_mfu")
        text += f"  MFU {mfu:6.1%}" if mfu is not None else "  MFU      -"
    return text


if __name__ == "__main__":
    sys.exit(main())
