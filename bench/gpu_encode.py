"""Part 5 of the GPU check, encode throughput: images/s and texts/s at batch 1 and 256 in bf16 for
base, a ViT-B/32-sized preset and open_clip's ViT-B-32 (random weights) imported by `clipforge model import`."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpu_steps import ROOT, Part, free_cuda, run_logged


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
    run_logged(_clipforge("model", "import", f"open_clip:{src}", "--arch", "ViT-B-32", "--out", str(out)),
               part.left() - 15)
    return out


def part_encode(part: Part) -> None:
    import model_bench
    import torch
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
        free_cuda()

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

