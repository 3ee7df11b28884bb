"""Gradient accumulation with cached features equals one big batch (loss and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch

from model import CLIP, caption_groups, preset_config
from training.step import ContrastiveModule, forward_backward


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: far faster on a shared 2-core machine, and restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(dropout: float = 0.0) -> tuple[CLIP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = preset_config("mini-32", img_n_layers=2, text_n_layers=2, vocab_size=64,
                        img_dropout_rate=dropout, text_dropout_rate=dropout)
    model = CLIP(cfg).train()
    pixels = torch.randn(8, 3, 32, 32)
    ids = torch.randint(3, 64, (8, 10))
    ids[:, 0], ids[:, -1] = 1, 2
    ids[::2, 6:] = 0
    ids[::2, 5] = 2
    return model, pixels, ids


def _grads(model: CLIP) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("duplicates", [False, True])
def test_accumulation_2x4_equals_batch_8(duplicates: bool) -> None:
    model, pixels, ids = _setup()
    groups = None
    if duplicates:  # captions 0 and 5 (in different micro-batches) and 2 and 3 are identical
        ids[5], ids[3] = ids[0], ids[2]
        groups = caption_groups(ids, pad_id=0)
        assert len(set(groups.tolist())) == 6
    twin = copy.deepcopy(model)
    torch.manual_seed(123)
    loss_full = forward_backward(ContrastiveModule(model), pixels, ids, accum_steps=1, groups=groups)
    torch.manual_seed(123)
    loss_acc = forward_backward(ContrastiveModule(twin), pixels, ids, accum_steps=2, groups=groups)
    g_full, g_acc = _grads(model), _grads(twin)
    assert g_full.keys() == g_acc.keys()
    assert loss_acc == pytest.approx(loss_full, rel=1e-5)
    for name in g_full:
        assert torch.allclose(g_full[name], g_acc[name], atol=1e-5, rtol=1e-4), name
    # The temperature is counted once, not once per micro-batch (the naive recipe doubles it).
    assert float(g_acc["logit_scale"]) == pytest.approx(float(g_full["logit_scale"]), rel=1e-4)


def test_accumulation_with_dropout_replays_masks() -> None:
    """Each micro-batch's recompute sees the dropout mask of its cached pass, so the gradient is
    the exact gradient of the loss that was reported."""
    model, pixels, ids = _setup(0.1)
    twin = copy.deepcopy(model)
    torch.manual_seed(7)
    loss = forward_backward(ContrastiveModule(model), pixels, ids, accum_steps=4)
    # Reference: the same dropout masks, drawn micro-batch by micro-batch, one full-batch loss.
    torch.manual_seed(7)
    from model import clip_loss

    parts = list(zip(torch.tensor_split(pixels, 4), torch.tensor_split(ids, 4)))
    imgs, txts = [], []
    for p, t in parts:
        imgs.append(twin.encode_image(p))
        txts.append(twin.encode_text(t))
    ref = clip_loss(torch.cat(imgs), torch.cat(txts), twin.scale())
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5)
    for name, g in _grads(twin).items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, g, atol=1e-5, rtol=1e-4), name


def test_accumulation_leaves_rng_where_the_step_ends() -> None:
    model, pixels, ids = _setup(0.1)
    torch.manual_seed(5)
    forward_backward(ContrastiveModule(model), pixels, ids, accum_steps=2)
    a = torch.rand(3)
    model.zero_grad()
    torch.manual_seed(5)
    forward_backward(ContrastiveModule(model), pixels, ids, accum_steps=2)
    assert torch.equal(torch.rand(3), a)
