"""Encode throughput of a ViT-B/32-sized clipforge model: the torch path, its ONNX export under
onnxruntime and transformers' CLIPModel (interop.hf_export's folder) on the same weights.

    python bench/interop_bench.py                                    # batch 1 and 32, 1 and 2 threads
    python bench/interop_bench.py --warmup 1 --iters 3 --batches 1 32 --threads 1 2
    python bench/interop_bench.py --show bench/results/interop_bench.json

The model has OpenAI ViT-B/32's shape (224 px, patch 32, 768 x 12 with 12 heads; text 512 x 12
with 8 heads, 77 tokens, 49,408-token vocabulary, learned positions; 512-d embeddings;
QuickGELU, layer-norm eps 1e-5) and random weights: speed does not depend on their values. Its
tokenizer is CLIP's BPE when the open_clip wheel `make install` keeps is in .cache/wheels (the
transformers export needs it), else one trained on a few captions. The checkpoint, its ONNX
export and its transformers folder are built once under --work-dir and reused while the
checkpoint's content hash is the same.

Every implementation gets the same pixels and the same captions (8-24 tokens padded to 77, as
bench/model_bench.py makes them). clipforge's text tower and OnnxEncoder drop the padding
columns after the longest caption themselves; transformers gets the ids cut there too, as its
tokenizer's padding="longest" gives them. Before timing, each implementation's embeddings are
compared with clipforge's (max abs difference, in the table and the JSON).

Implementations alternate call by call (the order flips every iteration), so a shared machine
slows them alike. Each figure is the best of the timed iterations as wall-clock throughput and
as samples per CPU-second of this process (both torch's and onnxruntime's threads count); the
JSON keeps medians and the load average before and after. Prints a table and writes
bench/results/interop_bench.json (rewritten after every row).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from model_bench import make_batch, timed

from model import (
    CLIP,
    CLIPConfig,
    CLIPTokenizer,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from model.errors import ClipforgeError
from model.tokenizer import clip_bpe_from_merges_file

WHEELS = ROOT / ".cache" / "wheels"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CPU = torch.device("cpu")
UNITS = {"image": "images/s", "text": "texts/s"}


# --------------------------------------------------------------------------- the model
def clip_tokenizer(work_dir: Path) -> CLIPTokenizer:
    """CLIP's BPE from the kept open_clip wheel (nothing downloaded), else a small trained byte-level BPE."""
    wheels = sorted(WHEELS.glob("open_clip_torch-*.whl"))
    if wheels:
        gz = work_dir / "bpe_simple_vocab_16e6.txt.gz"
        with zipfile.ZipFile(wheels[-1]) as zf:
            gz.write_bytes(zf.read(BPE_MEMBER))
        return CLIPTokenizer.from_clip_bpe(*clip_bpe_from_merges_file(gz), max_length=77)
    captions = [f"a photo of a {c} {o}" for c in ("red", "blue", "green", "small", "big") for o in ("dog", "cat", "car")]
    return CLIPTokenizer.train(captions * 4, vocab_size=512, max_length=77)


def vit_b_32_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    """OpenAI ViT-B/32's shape in clipforge's config."""
    return CLIPConfig(
        img_size=224, patch_size=32, img_dim=768, img_n_heads=12, img_n_layers=12, img_pool="cls",
        vocab_size=49408, max_seq_len=77, text_dim=512, text_n_heads=8, text_n_kv_heads=8, text_n_layers=12,
        text_pos="learned", align_dim=512, mlp_act="quick_gelu", eps=1e-5, image_resize="shortest_edge",
        pad_token_id=tokenizer.pad_id, sot_token_id=tokenizer.sot_id, eot_token_id=tokenizer.eot_id,
    )


def build_checkpoint(work_dir: Path) -> Path:
    """The random-weight checkpoint (seed 0), written once; a later run with the same config reuses it."""
    ckpt = work_dir / "vit-b-32"
    tokenizer = clip_tokenizer(work_dir)
    cfg = vit_b_32_config(tokenizer)
    if (ckpt / "config.json").is_file() and json.loads((ckpt / "config.json").read_text()) == cfg.to_dict():
        return ckpt
    torch.manual_seed(0)
    save_checkpoint(ckpt, CLIP(cfg), tokenizer, {"step": 0, "note": "random weights for bench/interop_bench.py"})
    return ckpt


def _export_once(export: Callable[[Path, Path], Any], ckpt: Path, folder: Path, *, marker: str, what: str) -> Path:
    """folder, exported from ckpt unless its marker file already names the checkpoint's content hash."""
    try:
        current = json.loads((folder / marker).read_text()).get("content_hash") == read_meta(ckpt)["content_hash"]
    except (OSError, ValueError):
        current = False
    if not current:
        print(f"exporting to {what} (once per checkpoint) ...", flush=True)
        export(ckpt, folder)
    return folder


# --------------------------------------------------------------------------- the implementations
class Impl:
    """One way to run the model: embeddings from the benchmark's pixels and padded ids."""

    name = ""

    def encode_image(self, pixels: torch.Tensor) -> np.ndarray: ...
    def encode_text(self, ids: torch.Tensor) -> np.ndarray: ...
    def set_threads(self, n: int) -> None: ...


class Clipforge(Impl):
    name = "clipforge"

    def __init__(self, ckpt: Path) -> None:
        self.model, _, _ = load_checkpoint(ckpt)

    def set_threads(self, n: int) -> None:
        torch.set_num_threads(n)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> np.ndarray:
        return self.model.encode_image(pixels).numpy()

    @torch.inference_mode()
    def encode_text(self, ids: torch.Tensor) -> np.ndarray:
        return self.model.encode_text(ids).numpy()


class OnnxRuntime(Impl):
    """interop.onnx_runtime.OnnxEncoder, one session pair per thread count (onnxruntime fixes it per session)."""

    name = "onnxruntime"

    def __init__(self, export_dir: Path, threads: list[int]) -> None:
        from interop.onnx_runtime import OnnxEncoder

        self.encoders = {n: OnnxEncoder(export_dir, threads=n) for n in threads}
        self.current = self.encoders[threads[0]]

    def set_threads(self, n: int) -> None:
        self.current = self.encoders[n]

    def encode_image(self, pixels: torch.Tensor) -> np.ndarray:
        return self.current.encode_images(pixels)

    def encode_text(self, ids: torch.Tensor) -> np.ndarray:
        return self.current.encode_texts(ids)


class Transformers(Impl):
    """transformers' CLIPModel loaded from interop.hf_export.export_hf's folder of the same checkpoint."""

    name = "transformers"

    def __init__(self, hf_dir: Path, eot_id: int) -> None:
        import transformers

        self.model = transformers.CLIPModel.from_pretrained(str(hf_dir)).eval()
        self.eot_id = eot_id

    def set_threads(self, n: int) -> None:
        torch.set_num_threads(n)

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        """get_*_features returns a tensor in transformers 4.x, an output object with pooler_output in 5.x."""
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> np.ndarray:
        return F.normalize(self._features(self.model.get_image_features(pixel_values=pixels)), dim=-1).numpy()

    @torch.inference_mode()
    def encode_text(self, ids: torch.Tensor) -> np.ndarray:
        # padding="longest": the columns after the last end-of-text token are not sent.
        last = int((ids == self.eot_id).int().argmax(dim=1).max())
        return F.normalize(self._features(self.model.get_text_features(input_ids=ids[:, : last + 1])), dim=-1).numpy()


def build_impls(ckpt: Path, work_dir: Path, threads: list[int], *, onnx: bool, hf: bool) -> tuple[list[Impl], dict]:
    """clipforge always; onnxruntime and transformers where they can be built, with the reason where not."""
    impls: list[Impl] = [Clipforge(ckpt)]
    skipped: dict[str, str] = {}
    if onnx:
        try:
            from interop.onnx_export import CONFIG, export_onnx

            folder = _export_once(export_onnx, ckpt, work_dir / "vit-b-32-onnx", marker=CONFIG, what="ONNX")
            impls.append(OnnxRuntime(folder, threads))
        except (ImportError, ClipforgeError) as exc:
            skipped["onnxruntime"] = str(exc)
    if hf:
        try:
            from interop.hf_export import NOTES_FILE, export_hf

            folder = _export_once(export_hf, ckpt, work_dir / "vit-b-32-hf", marker=NOTES_FILE, what="transformers")
            impls.append(Transformers(folder, impls[0].model.cfg.eot_token_id))
        except (ImportError, ClipforgeError) as exc:
            skipped["transformers"] = str(exc)
    return impls, skipped


# --------------------------------------------------------------------------- timing
def agreement(impls: list[Impl], pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Max |embedding - clipforge's| per implementation and tower."""
    ref_img, ref_txt = impls[0].encode_image(pixels), impls[0].encode_text(ids)
    return {impl.name: {"image": float(np.abs(impl.encode_image(pixels) - ref_img).max()),
                        "text": float(np.abs(impl.encode_text(ids) - ref_txt).max())} for impl in impls[1:]}


def measure(impls: list[Impl], op: str, x: torch.Tensor, warmup: int, iters: int) -> dict[str, tuple[list, list]]:
    """Per-iteration (wall, CPU) seconds per implementation, the order flipping every iteration."""
    def call(impl: Impl) -> Callable[[], object]:
        return (lambda: impl.encode_image(x)) if op == "image" else (lambda: impl.encode_text(x))

    times: dict[str, tuple[list, list]] = {impl.name: ([], []) for impl in impls}
    for i in range(warmup + iters):
        for impl in impls if i % 2 == 0 else impls[::-1]:
            wall, cpu = timed(call(impl), CPU)
            if i >= warmup:
                times[impl.name][0].append(wall)
                times[impl.name][1].append(cpu)
    return times


def format_row(row: dict, names: list[str]) -> str:
    label = f"{row['op']:5s} batch {row['batch']:3d}  {row['threads']} thread{'s' if row['threads'] > 1 else ' '}"
    wall = "  ".join(
        f"{n} {row[f'{n}_per_s']:7.1f}" + (f" ({row[f'{n}_vs_clipforge']:4.2f}x)" if n != "clipforge" else "")
        for n in names)
    cpu = "  ".join(f"{n} {row[f'{n}_per_cpu_s']:7.1f}" for n in names)
    return f"{label}  {UNITS[row['op']]:8s} wall: {wall}  |  per CPU-s: {cpu}"


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"torch": torch.__version__}
    for name in ("onnxruntime", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--ops", nargs="+", default=["image", "text"], choices=["image", "text"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "interop_bench",
                        help="where the checkpoint and its exports are kept between runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "interop_bench.json")
    parser.add_argument("--show", type=Path, help="only print the table of a saved JSON result")
    args = parser.parse_args(argv)
    if args.show:
        saved = json.loads(args.show.read_text())
        print(f"{saved['command']}  (load {saved['load_before']} -> {saved['load_after']})")
        for row in saved["rows"]:
            print(format_row(row, saved["implementations"]))
        return 0
    if any(n < 1 for n in args.threads + args.batches):
        parser.error("--threads and --batches must be positive")

    args.work_dir.mkdir(parents=True, exist_ok=True)
    load_before = [round(v, 2) for v in os.getloadavg()]
    ckpt = build_checkpoint(args.work_dir)
    impls, skipped = build_impls(ckpt, args.work_dir, args.threads, onnx=not args.no_onnx, hf=not args.no_hf)
    names = [impl.name for impl in impls]
    for name, why in skipped.items():
        print(f"{name}: not measured ({why})")
    torch.set_num_threads(max(args.threads))
    check_pixels, check_ids = make_batch(impls[0].model.cfg, 2, seed=1)
    agree = agreement(impls, check_pixels, check_ids)
    for name, diffs in agree.items():
        print(f"{name}: max |embedding - clipforge's| image {diffs['image']:.1e}, text {diffs['text']:.1e}")
    print(f"{', '.join(f'{k} {v}' for k, v in versions().items() if v)}; {args.warmup} warm-up + {args.iters} "
          f"timed calls each, best of them; load average {load_before[0]} ({os.cpu_count()} cores)")

    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", **versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "config": impls[0].model.cfg.to_dict(),
        "content_hash": read_meta(ckpt)["content_hash"], "implementations": names, "skipped": skipped,
        "agreement": agree, "warmup": args.warmup, "iters": args.iters, "load_before": load_before, "rows": [],
    }
    for threads in args.threads:
        for impl in impls:
            impl.set_threads(threads)
        for batch in args.batches:
            pixels, ids = make_batch(impls[0].model.cfg, batch)
            for op in args.ops:
                times = measure(impls, op, pixels if op == "image" else ids, args.warmup, args.iters)
                row: dict[str, Any] = {"op": op, "batch": batch, "threads": threads}
                for name, (wall, cpu) in times.items():
                    row[f"{name}_per_s"] = batch / min(wall)
                    row[f"{name}_per_s_median"] = batch / statistics.median(wall)
                    row[f"{name}_per_cpu_s"] = batch / min(cpu)
                    row[f"{name}_vs_clipforge"] = row[f"{name}_per_s"] / row["clipforge_per_s"]
                result["rows"].append(row)
                result["load_after"] = [round(v, 2) for v in os.getloadavg()]
                print(format_row(row, names), flush=True)
                write_result(args.out, result)
    print(f"load average {load_before[0]} before, {result['load_after'][0]} after; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
