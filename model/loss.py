"""The symmetric contrastive loss, with features gathered across ranks when distributed."""

from __future__ import annotations

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


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """L = 1/2 [CE(image->text logits, y) + CE(text->image logits, y)] over the global batch.

    Features are L2-normalised embeddings. Under torch.distributed each rank scores its
    local rows against all ranks' columns (local-loss style: memory linear in the local
    batch). The mean of the per-rank losses equals the single-process loss on the
    concatenated batch, and DDP's gradient averaging makes the gradients equal too.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
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
    return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))
