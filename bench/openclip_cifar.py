"""open_clip baseline for the CIFAR-10 quality benchmark: train open_clip's CLIP from scratch, zero-shot eval.

This is the other half of a side-by-side with clipforge's cifar10 task in bench/quality_bench.py: same image
folders, same prompt templates, same preprocessing, same wall-clock budget and schedule shape, but open_clip's
model, loss (`open_clip.ClipLoss`), tokenizer and zero-shot classifier builder. It runs in its own venv
(torch + open_clip only), so it imports nothing from clipforge; the templates are read from
model/zeroshot.py as text.

    /work/openclip-venv/bin/python bench/openclip_cifar.py --train .cache/bench/cifar10/train \\
        --test .cache/bench/cifar10/test --minutes 15 --threads 2 --out bench/results/openclip-cifar10.json
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_FILE = ROOT / "model" / "zeroshot.py"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# Same normalisation as clipforge (the OpenAI CLIP statistics).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = 100.0

EMBED_DIM = 128
VISION_CFG: dict[str, Any] = {"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32,
                              "mlp_ratio": 4.0}
# Text depth defaults to the reference (4) and follows --text-layers (the quality bench passes its
# own model's depth, so the two towers match); open_clip keeps its stock 49,408-token tokenizer.
TEXT_CFG: dict[str, Any] = {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4,
                            "mlp_ratio": 4.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=Path, required=True, help="DIR/<class>/*.png training folders")
    p.add_argument("--test", type=Path, required=True, help="DIR/<class>/*.png test folders (zero-shot eval)")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-layers", type=int, default=TEXT_CFG["layers"], help="depth of the text tower")
    p.add_argument("--image-pool", choices=["tok", "avg"], default="tok",
                   help="open_clip's pooling of the image tower: class token (tok) or mean of patches (avg)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on a seeded random subset of this size")
    p.add_argument("--out", type=Path, required=True, help="JSON results path")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data
def read_templates(path: Path = TEMPLATES_FILE) -> list[str]:
    """DEFAULT_TEMPLATES from clipforge's inference module, parsed (not imported) so both sides share one list."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "DEFAULT_TEMPLATES" and node.value is not None:
            templates = list(ast.literal_eval(node.value))
            if templates and all(isinstance(t, str) and "{}" in t for t in templates):
                return templates
    raise SystemExit(f"error: no usable DEFAULT_TEMPLATES tuple in {path}")


def list_classes(root: Path) -> list[str]:
    """Class folders in sorted order, so label indices agree between train and test."""
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not folders:
        raise SystemExit(f"error: no class folders under {root}")
    return folders


def load_folder(root: Path, folders: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once into a (N, S, S, 3) uint8 tensor so training never waits on PIL."""
    files = [(label, f) for label, name in enumerate(folders) for f in sorted((root / name).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise SystemExit(f"error: no images under {root}")
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)  # preallocated: no list-then-stack copy
    for i, (_, f) in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            images[i] = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(images), torch.tensor([label for label, _ in files], dtype=torch.long)


def to_pixels(batch: torch.Tensor, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW, with a per-image random horizontal flip when training."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    if flip:
        mask = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------- model
def build_model() -> open_clip.CLIP:
    """open_clip's CLIP from a config dict; identical to what create_model instantiates for an fp32 config."""
    return open_clip.CLIP(embed_dim=EMBED_DIM, vision_cfg=dict(VISION_CFG), text_cfg=dict(TEXT_CFG))


def no_decay(name: str, param: torch.nn.Parameter, extra: set[str]) -> bool:
    """open_clip_train's exclusion rule (gain/bias/ln/bn/logit_scale), plus the model's no_weight_decay() set."""
    return (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            or name in extra)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with open_clip's usual CLIP betas/eps and two parameter groups (decay / no decay)."""
    extra = set(model.no_weight_decay())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not no_decay(n, p, extra)]
    rest = [p for n, p in named if no_decay(n, p, extra)]
    groups = [{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step: int, elapsed: float, budget: float, peak: float, warmup: int) -> float:
    """Linear warmup over steps, then cosine to 0 driven by elapsed/budget (the wall clock, as clipforge does)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, elapsed / budget)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- train
def train(model: open_clip.CLIP, images: torch.Tensor, labels: torch.Tensor, table: torch.Tensor,
          args: argparse.Namespace) -> dict[str, Any]:
    """Contrastive training until the wall-clock budget runs out; table[c, t] is class c's tokens in template t."""
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    loss_fn = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(args.seed)
    n, bs = images.shape[0], min(args.batch_size, images.shape[0])
    n_templates = table.shape[1]
    budget = args.minutes * 60.0
    step = seen = 0
    losses: list[float] = []
    model.train()
    start = time.monotonic()
    elapsed = 0.0
    while elapsed < budget:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - bs + 1, bs):  # drop the ragged last batch: a tiny batch is a weak contrastive step
            idx = order[i:i + bs]
            pixels = to_pixels(images[idx], flip=True, generator=gen)
            tmpl = torch.randint(n_templates, (bs,), generator=gen)  # a fresh template on every draw
            text = table[labels[idx], tmpl]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, elapsed, budget, args.lr, args.warmup_steps)
            image_features, text_features, logit_scale = model(pixels, text)
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
            step += 1
            seen += bs
            losses.append(float(loss.detach()))
            elapsed = time.monotonic() - start
            if elapsed >= budget:
                break
    tail = losses[-50:]
    return {"steps": step, "samples_seen": seen, "train_s": elapsed,
            "final_loss": sum(tail) / len(tail) if tail else float("nan"),
            "logit_scale": float(model.logit_scale.detach().exp())}


# ---------------------------------------------------------------------------------------------- eval
@torch.inference_mode()
def zero_shot(model: open_clip.CLIP, tokenizer: open_clip.SimpleTokenizer, classnames: list[str],
              templates: list[str], images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> dict[str, float]:
    """Top-1/top-5 with open_clip's own template-ensembled classifier (mean of normalised embeddings, renormed)."""
    model.eval()
    classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates,
                                                      num_classes_per_batch=None)
    k = min(5, len(classnames))
    top1 = top5 = 0
    for i in range(0, images.shape[0], batch):
        feats = model.encode_image(to_pixels(images[i:i + batch], flip=False), normalize=True)
        pred = (feats @ classifier).topk(k, dim=-1).indices
        y = labels[i:i + batch]
        top1 += int((pred[:, 0] == y).sum())
        top5 += int((pred == y[:, None]).any(dim=-1).sum())
    n = images.shape[0]
    return {"test_top1": top1 / n, "test_top5": top5 / n, "n_test": n}


def subset(images: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset (the folders are class-sorted, so the first n would be one class)."""
    if n is None or n >= images.shape[0]:
        return images, labels
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    TEXT_CFG["layers"] = args.text_layers
    VISION_CFG["pool_type"] = args.image_pool
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    templates = read_templates()
    folders = list_classes(args.train)
    classnames = [f.replace("_", " ") for f in folders]
    if list_classes(args.test) != folders:
        raise SystemExit("error: train and test class folders differ")

    t0 = time.monotonic()
    train_images, train_labels = load_folder(args.train, folders, VISION_CFG["image_size"])
    test_images, test_labels = load_folder(args.test, folders, VISION_CFG["image_size"])
    test_images, test_labels = subset(test_images, test_labels, args.max_test, args.seed)
    load_s = time.monotonic() - t0

    tokenizer = open_clip.SimpleTokenizer(context_length=TEXT_CFG["context_length"])
    # Every caption is a (class, template) pair: tokenise the table once, index it per draw.
    prompts = [t.format(c) for c in classnames for t in templates]
    table = tokenizer(prompts).view(len(classnames), len(templates), -1)

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    stats = train(model, train_images, train_labels, table, args)
    t1 = time.monotonic()
    metrics = zero_shot(model, tokenizer, classnames, templates, test_images, test_labels)
    eval_s = time.monotonic() - t1

    result = {
        "framework": "open_clip", "open_clip_version": open_clip.__version__, "torch": torch.__version__,
        "threads": args.threads, "minutes": args.minutes,
        "steps": stats["steps"], "samples_seen": stats["samples_seen"],
        "epochs": stats["samples_seen"] / train_images.shape[0],
        "samples_per_s": stats["samples_seen"] / stats["train_s"] if stats["train_s"] > 0 else 0.0,
        "train_s": stats["train_s"],
        "model": {"class": "open_clip.CLIP", "embed_dim": EMBED_DIM, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG,
                  "quick_gelu": False, "vision_pool": "tok", "text_pool": "argmax",
                  "tokenizer": "open_clip.SimpleTokenizer"},
        "params": n_params,
        **metrics,
        "final_loss": stats["final_loss"], "logit_scale": stats["logit_scale"],
        "load_s": load_s, "eval_s": eval_s, "n_train": int(train_images.shape[0]), "classes": classnames,
        "config": {"batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
                   "weight_decay": args.weight_decay, "seed": args.seed, "betas": [0.9, 0.98], "eps": 1e-6,
                   "grad_clip": 1.0, "max_logit_scale": MAX_LOGIT_SCALE, "schedule": "warmup(steps)+cosine(wall clock)",
                   "no_decay": "ndim<2, bn/ln/bias/logit_scale, model.no_weight_decay()", "loss": "open_clip.ClipLoss",
                   "templates": templates, "hflip": True, "mean": MEAN, "std": STD, "max_test": args.max_test,
                   "train": str(args.train), "test": str(args.test)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"open_clip {open_clip.__version__}: {stats['steps']} steps, {result['epochs']:.2f} epochs, "
          f"{result['samples_per_s']:.0f} samples/s, {n_params / 1e6:.2f}M params -> "
          f"top1 {metrics['test_top1']:.2%} top5 {metrics['test_top5']:.2%} on {metrics['n_test']} test images "
          f"(loss {stats['final_loss']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
