"""The symmetric contrastive loss, with features gathered across ranks when distributed."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, features.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size(), dim=0)[dist.get_rank()]


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All ranks' features concatenated in rank order, with gradients flowing back to each rank."""
    sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([features.shape[0]], device=features.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError("every rank must contribute the same local batch size (use drop_last)")
    return _AllGatherWithGrad.apply(features)


def caption_groups(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) token ids -> (B,) int64 ids, equal exactly when two captions have the same tokens.

    A content hash rather than a batch-local numbering, so the groups of different ranks
    (or micro-batches) can be compared after a gather.
    """
    rows = ids.detach().cpu().tolist()
    out = []
    for row in rows:
        while row and row[-1] == pad_id:
            row.pop()
        digest = hashlib.blake2b(repr(row).encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little", signed=True))
    return torch.tensor(out, dtype=torch.long, device=ids.device)


def _targets(row_groups: torch.Tensor, col_groups: torch.Tensor) -> torch.Tensor:
    """Each row's target distribution: uniform over the columns of its group."""
    same = (row_groups[:, None] == col_groups[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None, gather: bool = True,
) -> torch.Tensor:
    """L = 1/2 [CE(image->text logits, y) + CE(text->image logits, y)] over the global batch.

    Features are L2-normalised embeddings. Under torch.distributed each rank scores its
    local rows against all ranks' columns (local-loss style: memory linear in the local
    batch). The mean of the per-rank losses equals the single-process loss on the
    concatenated batch, and DDP's gradient averaging makes the gradients equal too.

    groups (B,), from caption_groups, marks pairs whose captions are identical. Identical
    texts cannot tell their images apart, so scoring them as negatives of each other only
    teaches the model noise (with class-template captions, such as an image folder's, most
    of a batch's negatives would be false). With groups, y for each row is uniform over
    its group's columns; when every caption is distinct this is exactly the one-hot loss.

    gather=False scores this process's batch alone: evaluation runs on one rank, and a
    collective that the other ranks never join would hang them all.
    """
    distributed = gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        rank = dist.get_rank()
        all_image = gather_features(image_features)
        all_text = gather_features(text_features)
        n = image_features.shape[0]
        labels = torch.arange(n, device=image_features.device) + rank * n
        logits_image = logit_scale * image_features @ all_text.t()
        logits_text = logit_scale * text_features @ all_image.t()
    else:
        labels = torch.arange(image_features.shape[0], device=image_features.device)
        logits_image = logit_scale * image_features @ text_features.t()
        logits_text = logits_image.t()
    if groups is not None:
        all_groups = groups
        if distributed:
            parts = [torch.empty_like(groups) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, groups.contiguous())
            all_groups = torch.cat(parts)
        labels = _targets(groups, all_groups)
    return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))
