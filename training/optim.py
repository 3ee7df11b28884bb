"""AdamW over the model's parameter groups and the warmup + cosine learning-rate schedule.

The schedule is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math

import torch

from model import CLIP


def build_optimizer(
    model: CLIP, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
    device: torch.device | None = None, text_lr_scale: float = 1.0, image_lr_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW with no decay on norms, biases, CLS, positions and temperature; fused kernels on CUDA.

    Frozen (locked) parameters are left out; each tower's groups carry its lr scale."""
    groups = model.param_groups(weight_decay, text_lr_scale, image_lr_scale)
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(
    step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr: float = 0.0,
    time_fraction: float | None = None,
) -> float:
    """Linear warmup from peak/warmup to peak over warmup_steps, then cosine down to min_lr at total_steps.

    `step` counts optimiser steps already taken (the lr used for step 0 is the first warmup value).
    With a wall-clock budget, time_fraction (elapsed / budget) moves the cosine along too,
    whichever of steps and time is further ahead, so a timed run still ends fully decayed.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if time_fraction is not None:
        progress = min(1.0, max(progress, time_fraction))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr, times each group's lr_scale (a tower's may differ)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
