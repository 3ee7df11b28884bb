"""The contrastive loss (hand computation, distributed = single process), temperature clamp, a training step."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import CLIP, CLIPConfig, caption_groups, clip_loss, preset_config

WORLD = 2
GLOBAL_BATCH = 8
DIM = 16
# Captions 0 and 3 are identical, and so are 1 and 5 (across the two ranks' halves).
CAPTION_IDS = torch.tensor([[1, 7, 2, 0], [1, 8, 9, 2], [1, 5, 2, 0], [1, 7, 2, 0], [1, 6, 2, 0], [1, 8, 9, 2],
                            [1, 4, 2, 0], [1, 9, 2, 0]])


def _features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=gen, dtype=torch.float64), dim=-1)
    return img, txt


def test_loss_equals_a_hand_computation() -> None:
    img, txt = _features()
    scale = 14.0
    n = img.shape[0]
    sims = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    img_to_txt = -sum(sims[i][i] - math.log(sum(math.exp(s) for s in sims[i])) for i in range(n)) / n
    txt_to_img = -sum(sims[j][j] - math.log(sum(math.exp(sims[i][j]) for i in range(n))) for j in range(n)) / n
    expected = 0.5 * (img_to_txt + txt_to_img)
    got = clip_loss(img, txt, torch.tensor(scale, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_loss_is_low_for_matching_pairs_and_symmetric() -> None:
    img, txt = _features()
    scale = torch.tensor(50.0, dtype=torch.float64)
    assert clip_loss(img, img, scale) < 0.01 < clip_loss(img, txt, scale)
    assert clip_loss(img, txt, scale).item() == pytest.approx(clip_loss(txt, img, scale).item(), rel=1e-12)


def test_caption_groups_match_exactly_the_identical_captions() -> None:
    groups = caption_groups(CAPTION_IDS, pad_id=0)
    same = (groups[:, None] == groups[None, :]).int()
    expected = torch.eye(GLOBAL_BATCH, dtype=torch.int)
    for a, b in ((0, 3), (1, 5)):
        expected[a, b] = expected[b, a] = 1
    assert torch.equal(same, expected)
    # trailing pads do not matter
    longer = torch.nn.functional.pad(CAPTION_IDS, (0, 3))
    assert torch.equal(caption_groups(longer, pad_id=0), groups)


def test_grouped_loss_is_the_plain_loss_without_duplicates_and_a_hand_computation_with_them() -> None:
    img, txt = _features()
    scale = torch.tensor(14.0, dtype=torch.float64)
    distinct = torch.arange(GLOBAL_BATCH) * 1000
    assert clip_loss(img, txt, scale, distinct).item() == pytest.approx(clip_loss(img, txt, scale).item(), rel=1e-12)
    groups = caption_groups(CAPTION_IDS, pad_id=0)
    n = GLOBAL_BATCH
    sims = [[14.0 * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    members = [[j for j in range(n) if groups[j] == groups[i]] for i in range(n)]

    def ce(row: list[float], targets: list[int]) -> float:
        lse = math.log(sum(math.exp(v) for v in row))
        return -sum(row[t] - lse for t in targets) / len(targets)

    i2t = sum(ce(sims[i], members[i]) for i in range(n)) / n
    t2i = sum(ce([sims[k][j] for k in range(n)], members[j]) for j in range(n)) / n
    assert clip_loss(img, txt, scale, groups).item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-12)


# --------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        img, txt = _features()
        n = GLOBAL_BATCH // WORLD
        local_img = img[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        local_txt = txt[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
        groups = caption_groups(CAPTION_IDS[rank * n : (rank + 1) * n], pad_id=0)
        for name, g in (("plain", None), ("grouped", groups)):
            for t in (local_img, local_txt, scale):
                t.grad = None
            loss = clip_loss(local_img, local_txt, scale, g)
            loss.backward()
            np.savez(
                Path(out_dir) / f"{name}{rank}.npz", loss=loss.detach().numpy(), img_grad=local_img.grad.numpy(),
                txt_grad=local_txt.grad.numpy(), scale_grad=scale.grad.numpy(),
            )
        # Unequal local batches are refused with a clear message, not a hang or a wrong loss.
        try:
            clip_loss(img[: 1 + rank], txt[: 1 + rank], scale)
        except ValueError as exc:
            (Path(out_dir) / f"rank{rank}.err").write_text(str(exc))
        dist.barrier()  # no rank tears down gloo while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist-loss")
    mp.spawn(_distributed_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["plain", "grouped"])
def test_distributed_loss_equals_single_process_loss(distributed_run: Path, name: str) -> None:
    tmp_path = distributed_run
    img, txt = _features()
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    loss = clip_loss(img, txt, scale, caption_groups(CAPTION_IDS, pad_id=0) if name == "grouped" else None)
    loss.backward()

    ranks = [np.load(tmp_path / f"{name}{r}.npz") for r in range(WORLD)]
    # DDP averages the per-rank losses and gradients: the mean loss is the global loss...
    assert np.mean([r["loss"] for r in ranks]) == pytest.approx(loss.item(), rel=1e-10)
    assert np.mean([r["scale_grad"] for r in ranks]) == pytest.approx(scale.grad.item(), rel=1e-10)
    # ...and each rank's feature gradient, averaged by DDP (/WORLD), is the global one for its rows.
    n = GLOBAL_BATCH // WORLD
    for r, data in enumerate(ranks):
        np.testing.assert_allclose(data["img_grad"] / WORLD, img.grad[r * n : (r + 1) * n].numpy(), rtol=1e-9,
                                   atol=1e-12)
        np.testing.assert_allclose(data["txt_grad"] / WORLD, txt.grad[r * n : (r + 1) * n].numpy(), rtol=1e-9,
                                   atol=1e-12)
        assert "same local batch size" in (tmp_path / f"rank{r}.err").read_text()


# --------------------------------------------------------------------------- temperature
def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100() -> None:
    model = CLIP(preset_config("mini-32"))
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[1, 5, 2], [1, 6, 2]])
    logits, _ = model(pixels, ids)
    assert logits.abs().max().item() <= 100.0 + 1e-3
    cos = model.encode_image(pixels) @ model.encode_text(ids).T
    assert torch.allclose(logits, 100.0 * cos, atol=1e-4)
    # The clamp blocks the gradient that would push the scale further up.
    logits.sum().backward()
    assert model.logit_scale.grad.item() == 0.0
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0


def test_similarity_is_a_distribution_over_texts() -> None:
    model = CLIP(preset_config("mini-32")).eval()
    probs = model.similarity(torch.randn(3, 3, 32, 32), torch.tensor([[1, 5, 2], [1, 6, 2], [1, 7, 8]]))
    assert probs.shape == (3, 3)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(3), atol=1e-6)


# --------------------------------------------------------------------------- optimisation
def test_param_groups_decay_only_matrices_and_scale_the_text_tower() -> None:
    model = CLIP(preset_config("mini-32", text_pos="learned"))
    groups = model.param_groups(0.1, text_lr_scale=0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"logit_scale", "visual.cls_token", "visual.pos_embed", "text.pos_embed"} <= no_decay
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 for n in decay) and {g["weight_decay"] for g in groups} == {0.0, 0.1}
    assert decay.isdisjoint(no_decay) and len(decay) + len(no_decay) == len(params)
    scaled = {names[id(p)] for g in groups if g["lr_scale"] == 0.25 for p in g["params"]}
    assert scaled == {n for n in params if n.startswith(("text.", "text_proj."))}
    assert all(g["lr_scale"] in (0.25, 1.0) for g in groups)


def test_one_training_step_reduces_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    cfg = CLIPConfig(img_size=16, patch_size=4, img_dim=64, img_n_heads=4, img_n_layers=2, vocab_size=64,
                     max_seq_len=12, text_dim=64, text_n_heads=4, text_n_kv_heads=2, text_n_layers=2, align_dim=32)
    model = CLIP(cfg).train()
    pixels = torch.randn(16, 3, 16, 16)
    ids = torch.randint(3, 64, (16, 8))
    ids[:, 0], ids[:, -1] = 1, 2
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)

    def loss_now() -> torch.Tensor:
        return clip_loss(model.encode_image(pixels), model.encode_text(ids), model.scale())

    before = loss_now()
    opt.zero_grad()
    before.backward()
    opt.step()
    model.clamp_logit_scale_()
    with torch.no_grad():
        after = loss_now()
    assert after.item() < before.item() - 0.05


def test_flops_and_mfu_estimates() -> None:
    model = CLIP(preset_config("mini-32"))
    cfg = model.cfg
    # Patch embedding + 4 layers x (QKV with half the KV heads ... ) checked against the formula's parts.
    assert model.flops_per_image() > 2 * cfg.img_n_layers * (cfg.n_patches + 1) * 12 * cfg.img_dim**2 * 0.99
    assert model.flops_per_text(8) < model.flops_per_text(32)
    mfu = model.estimate_mfu(100.0, 1e12)
    assert mfu == pytest.approx(3 * (model.flops_per_image() + model.flops_per_text()) * 100.0 / 1e12)
