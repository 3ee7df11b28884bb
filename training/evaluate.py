"""Evaluation: validation loss, retrieval recall@k in both directions, zero-shot accuracy.

Retrieval follows the Flickr/COCO convention for several captions per image: an image
query is right when any of its captions is in the top k; every caption is a text query,
right when its own image is in the top k. Zero-shot classifies each image against class
embeddings averaged over prompt templates (normalise, mean, renormalise), with the
arithmetic of model/zeroshot.py that inference and the service use too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from model import (
    CLIP,
    DEFAULT_MAX_PIXELS,
    CLIPInference,
    CLIPTokenizer,
    ImageTransform,
    clip_loss,
    templates_or_default,
    top_k_accuracy,
)


# --------------------------------------------------------------------------- pure metrics
def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_owner: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024, text_group: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@k for image->text and text->image. text_owner[j] is the image index of caption j.

    text_group[j] (optional) numbers identical caption strings alike: the same words cannot
    tell their images apart, so a caption identical to one of an image's own counts as right
    for it, both ways (with class-template captions most captions are shared). A rank is the
    number of wrong candidates scored at least as high as the best right one: ties count
    against, so a collapsed model (all embeddings equal) scores chance, not 1.0. Non-finite
    embeddings give NaN metrics, never a perfect score.
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    names = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
    if not (torch.isfinite(image_emb).all() and torch.isfinite(text_emb).all()):
        return {**{name: float("nan") for name in names}, "recall_mean": float("nan")}
    text_owner = text_owner.long()
    group = torch.arange(m) if text_group is None else text_group.long()
    n_groups = int(group.max()) + 1 if m else 1
    # (image, caption group) pairs that are right answers, as sorted keys for isin
    right = torch.unique(text_owner * n_groups + group)
    i2t_rank = torch.empty(n, dtype=torch.long)
    t2i_rank = torch.empty(m, dtype=torch.long)
    for start in range(0, n, chunk):
        sims = image_emb[start : start + chunk].float() @ text_emb.float().t()  # (c, M)
        rows = torch.arange(start, min(start + chunk, n))
        ok = torch.isin(rows.unsqueeze(1) * n_groups + group.unsqueeze(0), right)  # (c, M)
        best = sims.masked_fill(~ok, float("-inf")).max(dim=1).values
        i2t_rank[rows] = ((sims >= best.unsqueeze(1)) & ~ok).sum(dim=1)
    images = torch.arange(n)
    for start in range(0, m, chunk):
        sims = text_emb[start : start + chunk].float() @ image_emb.float().t()  # (c, N)
        cols = torch.arange(start, min(start + chunk, m))
        ok = torch.isin(images.unsqueeze(0) * n_groups + group[cols].unsqueeze(1), right)  # (c, N)
        best = sims.masked_fill(~ok, float("-inf")).max(dim=1).values
        t2i_rank[cols] = ((sims >= best.unsqueeze(1)) & ~ok).sum(dim=1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean()) if n else 0.0
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean()) if m else 0.0
    out["recall_mean"] = float(np.mean([out[name] for name in names]))
    return out


def class_embeddings(
    model: CLIP, tokenizer: CLIPTokenizer, class_names: Sequence[str], templates: Sequence[str] | None,
    device: torch.device,
) -> torch.Tensor:
    """Template-ensembled class embeddings via the inference API (one path for training and serving)."""
    was_training = model.training
    inference = CLIPInference(model, tokenizer, device=device)
    emb = inference.label_embeddings(list(class_names), templates_or_default(templates))
    model.train(was_training)
    return torch.from_numpy(emb)


# --------------------------------------------------------------------------- embedding passes
def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def embed_records(
    model: CLIP, records: list, transform: ImageTransform, device: torch.device, batch_size: int = 256,
    num_workers: int = 0, autocast_dtype: torch.dtype | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(embeddings of the readable images, their positions in records, number of unreadable ones)."""
    from training.data import CaptionDataset, collate

    ds = CaptionDataset(records, transform, seed=0, max_pixels=max_pixels)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    embs, idx, n_bad = [], [], 0
    for batch in loader:
        n_bad += batch["n_bad"]
        if len(batch["indices"]) == 0:
            continue
        with _autocast(device, autocast_dtype):
            e = model.encode_image(batch["pixels"].to(device, non_blocking=True))
        embs.append(e.float().cpu())
        idx.append(batch["indices"])
    dim = model.cfg.align_dim
    return (torch.cat(embs) if embs else torch.zeros(0, dim)), (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)), n_bad


@torch.no_grad()
def embed_texts(
    model: CLIP, tokenizer: CLIPTokenizer, texts: Sequence[str], device: torch.device, batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    out = [torch.zeros(0, model.cfg.align_dim)]
    for start in range(0, len(texts), batch_size):
        ids = tokenizer.encode(list(texts[start : start + batch_size])).to(device)
        with _autocast(device, autocast_dtype):
            out.append(model.encode_text(ids).float().cpu())
    return torch.cat(out)


def contrastive_val_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, batch_size: int,
    groups: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean CLIP loss and in-batch i2t/t2i accuracy over consecutive batches of paired embeddings.

    groups[i] numbers identical caption strings alike, as the training loss does by default:
    pairs with the same caption are matches of each other, for the loss and the accuracy.
    """
    losses, weights, i2t, t2i = [], [], 0.0, 0.0
    n = image_emb.shape[0]
    groups = torch.arange(n) if groups is None else groups.long()
    for start in range(0, n, batch_size):
        img, txt = image_emb[start : start + batch_size], text_emb[start : start + batch_size]
        g = groups[start : start + batch_size]
        if img.shape[0] < 2 and n >= 2:
            continue  # a trailing single pair has a trivial loss
        losses.append(float(clip_loss(img, txt, logit_scale, g, gather=False)))  # rank 0 evaluates alone
        weights.append(img.shape[0])
        logits = img @ txt.t()
        i2t += float((g[logits.argmax(dim=1)] == g).sum())
        t2i += float((g[logits.argmax(dim=0)] == g).sum())
    total = max(1, sum(weights))
    return {
        "val_loss": float(np.average(losses, weights=weights)) if losses else float("nan"),
        "val_i2t_acc": i2t / total,
        "val_t2i_acc": t2i / total,
    }


@contextmanager
def _eval_mode(model: CLIP) -> Iterator[None]:
    """Evaluation mode for the block, then the mode the caller had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _embed_eval_images(
    model: CLIP, records: list, device: torch.device, *, batch_size: int, num_workers: int,
    autocast_dtype: torch.dtype | None, max_pixels: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """embed_records with the model's own evaluation transform."""
    transform = ImageTransform.for_config(model.cfg, train=False)
    return embed_records(model, records, transform, device, batch_size, num_workers, autocast_dtype, max_pixels)


def _zeroshot_accuracy(
    model: CLIP, tokenizer: CLIPTokenizer, image_emb: torch.Tensor, labels: torch.Tensor, *,
    class_names: Sequence[str], templates: Sequence[str] | None, device: torch.device,
) -> dict[str, float]:
    """Top-1 and top-5 of the images against the template-ensembled class embeddings."""
    cls_emb = class_embeddings(model, tokenizer, class_names, templates, device).float()
    return top_k_accuracy(image_emb, labels, cls_emb)


def evaluate(
    model: CLIP, tokenizer: CLIPTokenizer, records: list, device: torch.device, *,
    class_names: Sequence[str] | None = None, templates: Sequence[str] | None = None, loss_batch_size: int = 128,
    batch_size: int = 256, num_workers: int = 0, autocast_dtype: torch.dtype | None = None,
    retrieval: bool | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """All metrics that apply to a record list; labelled records (with class_names) add zero-shot.

    Retrieval runs on caption data; for labelled data whose captions are templates (many
    images share one caption) it is skipped unless retrieval=True.
    """
    with _eval_mode(model):
        img_emb, idx, n_bad = _embed_eval_images(model, records, device, batch_size=batch_size, num_workers=num_workers,
                                                 autocast_dtype=autocast_dtype, max_pixels=max_pixels)
        kept = [records[i] for i in idx.tolist()]
        out: dict[str, Any] = {"n_images": len(kept), "n_bad": n_bad}
        if not kept:
            return out
        texts, owner, first = [], [], []
        for j, r in enumerate(kept):
            first.append(len(texts))
            texts.extend(r.captions)
            owner.extend([j] * len(r.captions))
        text_emb = embed_texts(model, tokenizer, texts, device, batch_size, autocast_dtype)
        owner_t = torch.tensor(owner)
        first_caption = torch.tensor(first, dtype=torch.long)
        out["n_captions"] = len(texts)
        ids: dict[str, int] = {}
        text_group = torch.tensor([ids.setdefault(t, len(ids)) for t in texts], dtype=torch.long)
        out.update(contrastive_val_loss(img_emb, text_emb[first_caption], model.scale().detach().float().cpu(),
                                        loss_batch_size, groups=text_group[first_caption]))
        labelled = bool(class_names) and all(r.label is not None for r in kept)
        if retrieval is None:
            retrieval = not labelled
        if retrieval:
            out.update(retrieval_metrics(img_emb, text_emb, owner_t, text_group=text_group))
        if labelled:
            labels = torch.tensor([r.label for r in kept])
            zs = _zeroshot_accuracy(model, tokenizer, img_emb, labels, class_names=class_names, templates=templates,
                                    device=device)
            out["zeroshot_top1"], out["zeroshot_top5"] = zs["top1"], zs["top5"]
        return out


def zeroshot_only(
    model: CLIP, tokenizer: CLIPTokenizer, records: list, class_names: Sequence[str], templates: Sequence[str] | None,
    device: torch.device, batch_size: int = 256, num_workers: int = 0, autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 on a labelled record list (the per-epoch held-out check)."""
    with _eval_mode(model):
        img_emb, idx, n_bad = _embed_eval_images(model, records, device, batch_size=batch_size, num_workers=num_workers,
                                                 autocast_dtype=autocast_dtype, max_pixels=DEFAULT_MAX_PIXELS)
        labels = torch.tensor([records[i].label for i in idx.tolist()])
        zs = _zeroshot_accuracy(model, tokenizer, img_emb, labels, class_names=class_names, templates=templates,
                                device=device)
        return {"top1": zs["top1"], "top5": zs["top5"], "n_images": len(idx), "n_bad": n_bad}
