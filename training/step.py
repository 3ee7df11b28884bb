"""One contrastive optimisation step's forward/backward, with feature-cached gradient accumulation.

Plain accumulation would shrink the contrastive batch (each micro-batch would only see its
own negatives). Instead, as open_clip does: embed every micro-batch without gradients,
then re-embed one micro-batch at a time with gradients and score it against the cached
features of all the others. Summed over micro-batches this is exactly the gradient of
the full-batch loss, at the cost of one extra forward pass. Two refinements over the
usual recipe: each re-embedding replays the RNG state of its first pass (so dropout
masks match the cached features), and the temperature receives its gradient in one pass
only (otherwise it would be counted once per micro-batch).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from model import CLIP, clip_loss


class ContrastiveModule(nn.Module):
    """CLIP behind one forward() so DDP sees every parameter use: (image feats, text feats, scale)."""

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.clip.encode_image(pixels), self._encode_text(ids), self.clip.scale()

    def _encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """A locked text tower (eval mode: no dropout) gives a caption the same features wherever it occurs,
        so each distinct caption of the batch is encoded once (template captions repeat many times)."""
        if "text" in self.clip.eval_towers and ids.shape[0] > 1:
            unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
            if unique.shape[0] < ids.shape[0]:
                return self.clip.encode_text(unique)[inverse]
        return self.clip.encode_text(ids)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward_backward(
    module: nn.Module, pixels: torch.Tensor, ids: torch.Tensor, *, accum_steps: int = 1,
    autocast: AbstractContextManager | None = None, groups: torch.Tensor | None = None,
) -> float:
    """Accumulate into .grad the gradient of the CLIP loss over the whole (local) batch; return the loss.

    module is a ContrastiveModule, possibly wrapped in DDP (then all but the last
    micro-batch run under no_sync, and the last one carries the temperature gradient).
    groups: the batch's caption groups (model.caption_groups), None for the plain one-hot loss.
    """
    autocast = autocast or nullcontext()
    n = pixels.shape[0]
    if accum_steps <= 1 or n < accum_steps:
        with autocast:
            img, txt, scale = module(pixels, ids)
        loss = clip_loss(img.float(), txt.float(), scale.float(), groups=groups)
        loss.backward()
        return float(loss.detach())

    device = pixels.device
    parts = list(zip(torch.tensor_split(pixels, accum_steps), torch.tensor_split(ids, accum_steps)))
    states, cached_img, cached_txt = [], [], []
    with torch.no_grad():
        for p, t in parts:
            states.append(_rng_state(device))
            with autocast:
                img, txt, _ = module(p, t)
            cached_img.append(img.float())
            cached_txt.append(txt.float())
    after = _rng_state(device)
    last = len(parts) - 1
    no_sync = getattr(module, "no_sync", None)
    loss_value = 0.0
    for j, (p, t) in enumerate(parts):
        _set_rng_state(states[j], device)
        ctx = no_sync() if (no_sync is not None and j < last) else nullcontext()
        with ctx:
            with autocast:
                img, txt, scale = module(p, t)
            if j != last:
                scale = scale.detach()
            all_img = torch.cat(cached_img[:j] + [img.float()] + cached_img[j + 1 :])
            all_txt = torch.cat(cached_txt[:j] + [txt.float()] + cached_txt[j + 1 :])
            loss = clip_loss(all_img, all_txt, scale.float(), groups=groups)
            loss.backward()
        loss_value = float(loss.detach())
    _set_rng_state(after, device)
    return loss_value
