"""Optimizer groups (no decay where it hurts) and the warmup + cosine schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from model import CLIP, preset_config
from training.optim import build_optimizer, lr_at, set_lr


def test_no_weight_decay_on_norms_biases_cls_positions_temperature() -> None:
    torch.manual_seed(0)
    model = CLIP(preset_config("mini-32", img_n_layers=1, text_n_layers=1, text_pos="learned"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.2, device=torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"logit_scale", "visual.cls_token", "visual.pos_embed", "text.pos_embed"} <= plain
    assert all(n.endswith("bias") or "norm" in n or n in {"logit_scale", "visual.cls_token", "visual.pos_embed",
                                                            "text.pos_embed"} for n in plain)
    assert "visual.blocks.0.attn.qkv.weight" in decayed and "text.tok_embed.weight" in decayed
    assert not any(n.endswith("bias") or "norm" in n for n in decayed)
    assert decayed | plain == set(names.values())
    assert all(g["weight_decay"] == 0.2 for g in opt.param_groups if g["weight_decay"] > 0)
    assert opt.defaults["fused"] in (False, None)  # fused kernels are for CUDA only


def test_text_lr_scale_slows_only_the_text_tower_and_zero_locks_it() -> None:
    torch.manual_seed(0)
    model = CLIP(preset_config("mini-32", img_n_layers=1, text_n_layers=1))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, text_lr_scale=0.0)
    set_lr(opt, 1e-2)
    assert sorted({g["lr"] for g in opt.param_groups}) == [0.0, 1e-2]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved != name.startswith(("text.", "text_proj.")), name


def test_decay_really_skips_the_no_decay_group() -> None:
    """With zero gradients, AdamW only decays: matrices shrink, gains and the temperature do not."""
    torch.manual_seed(0)
    model = CLIP(preset_config("mini-32", img_n_layers=1, text_n_layers=1))
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["logit_scale"], before["logit_scale"])
    assert torch.equal(after["visual.blocks.0.norm1.weight"], before["visual.blocks.0.norm1.weight"])
    w = "visual.blocks.0.attn.qkv.weight"
    assert torch.allclose(after[w], before[w] * (1 - 0.1 * 0.5))


def test_schedule_warmup_then_cosine() -> None:
    peak, total, warm = 1e-3, 110, 10
    assert lr_at(0, total, peak, warm) == pytest.approx(peak / 10)
    assert lr_at(4, total, peak, warm) == pytest.approx(peak * 5 / 10)
    assert lr_at(9, total, peak, warm) == pytest.approx(peak)
    assert lr_at(10, total, peak, warm) == pytest.approx(peak)  # cosine starts at the peak
    assert lr_at(60, total, peak, warm) == pytest.approx(peak / 2)  # halfway down
    assert lr_at(110, total, peak, warm) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(500, total, peak, warm, min_lr=1e-5) == pytest.approx(1e-5)  # stays at the floor
    mid = lr_at(35, total, peak, warm, min_lr=1e-4)
    assert mid == pytest.approx(1e-4 + 0.5 * (peak - 1e-4) * (1 + math.cos(math.pi * 25 / 100)))
    lrs = [lr_at(s, total, peak, warm) for s in range(warm, total)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # monotone decay after warmup


def test_schedule_without_warmup() -> None:
    assert lr_at(0, 10, 1.0, 0) == pytest.approx(1.0)
    assert lr_at(5, 10, 1.0, 0) == pytest.approx(0.5)


def test_schedule_follows_a_wall_clock_budget() -> None:
    # 10% of the steps but 50% of the time: the cosine is halfway down
    assert lr_at(20, 210, 1.0, 10, time_fraction=0.5) == pytest.approx(0.5)
    # steps ahead of time: steps decide
    assert lr_at(110, 210, 1.0, 10, time_fraction=0.1) == pytest.approx(0.5)
    assert lr_at(20, 210, 1.0, 10, time_fraction=1.7) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(3, 210, 1.0, 10, time_fraction=0.9) == pytest.approx(0.4)  # warmup is by steps
