"""The two towers: causality and padding invariance of text, EOT pooling, position interpolation."""

from __future__ import annotations

import pytest
import torch

from model import CLIP, CLIPConfig
from model.text import eot_positions
from model.vision import interpolate_pos_embed


def _micro(**kw) -> CLIPConfig:
    base = {
        "img_size": 16, "patch_size": 4, "img_dim": 32, "img_n_heads": 4, "img_n_layers": 2, "vocab_size": 64,
        "max_seq_len": 12, "text_dim": 32, "text_n_heads": 4, "text_n_kv_heads": 2, "text_n_layers": 2,
        "align_dim": 16,
    }
    return CLIPConfig(**{**base, **kw})


@pytest.fixture(params=[("rope", True), ("rope", False), ("learned", True)], ids=["rope-sdpa", "rope-math", "learned"])
def text_model(request: pytest.FixtureRequest) -> CLIP:
    torch.manual_seed(0)
    pos, flash = request.param
    return CLIP(_micro(text_pos=pos, use_sdpa=flash)).eval()


# --------------------------------------------------------------------------- text tower
@torch.no_grad()
def test_causality_changing_a_later_token_leaves_earlier_positions_unchanged(text_model: CLIP) -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 12), generator=gen)
    base = text_model.text.hidden_states(ids)
    for t in (0, 4, 10):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 61 + 3
        out = text_model.text.hidden_states(changed)
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6), t
        assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4), t  # the token itself matters


@torch.no_grad()
def test_text_embedding_is_invariant_to_pad_length_and_pad_values(text_model: CLIP) -> None:
    rows = [[1, 10, 11, 12, 2], [1, 20, 2], [1, 30, 31, 32, 33, 34, 35, 2]]

    def batch(width: int, pad_value: int) -> torch.Tensor:
        return torch.tensor([r + [pad_value] * (width - len(r)) for r in rows])

    ref = text_model.encode_text(batch(8, 0))
    for width, pad in [(12, 0), (8, 5), (12, 63), (10, 2)]:
        assert torch.allclose(text_model.encode_text(batch(width, pad)), ref, atol=1e-6), (width, pad)
    # Each row alone, unpadded, gives the same embedding as inside the padded batch.
    for i, r in enumerate(rows):
        assert torch.allclose(text_model.encode_text(torch.tensor([r])), ref[i : i + 1], atol=1e-5)


@torch.no_grad()
def test_text_is_pooled_at_the_eot_position(text_model: CLIP) -> None:
    ids = torch.tensor([[1, 40, 41, 2, 0, 0], [1, 50, 2, 0, 0, 0]])
    hidden = text_model.text.hidden_states(ids)
    pooled = text_model.text(ids)
    assert torch.allclose(pooled[0], hidden[0, 3], atol=1e-6)
    assert torch.allclose(pooled[1], hidden[1, 2], atol=1e-6)
    # Tokens after the EOT (a caption that continues) do not change the embedding.
    longer = torch.tensor([[1, 40, 41, 2, 9, 9]])
    assert torch.allclose(text_model.text(longer), pooled[:1], atol=1e-6)


def test_eot_positions_use_the_eot_token_not_the_largest_id() -> None:
    ids = torch.tensor([
        [1, 63, 62, 2, 0, 0],  # largest id is not EOT
        [1, 5, 6, 7, 8, 9],  # truncated without EOT: last real token
        [1, 2, 2, 0, 0, 0],  # first EOT wins
        [0, 0, 0, 0, 0, 0],  # all padding
    ])
    assert eot_positions(ids, eot_id=2, pad_id=0).tolist() == [3, 5, 1, 0]


def test_text_longer_than_max_seq_len_is_refused() -> None:
    model = CLIP(_micro())
    with pytest.raises(ValueError, match="exceeds max_seq_len=12"):
        model.encode_text(torch.ones(1, 13, dtype=torch.long))


def test_empty_batches_give_empty_embeddings() -> None:
    model = CLIP(_micro()).eval()
    assert model.encode_text(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 16)
    with torch.no_grad():
        assert model.encode_image(torch.zeros(0, 3, 16, 16)).shape == (0, 16)


# --------------------------------------------------------------------------- image tower
def test_interpolate_pos_embed_keeps_cls_and_smooth_fields() -> None:
    dim, grid = 6, 4
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    constant = torch.full((1, 1 + grid * grid, dim), 0.37)
    constant[:, 0] = 5.0
    out = interpolate_pos_embed(constant, 8)
    assert out.shape == (1, 65, dim)
    assert torch.equal(out[:, 0], constant[:, 0])
    assert torch.allclose(out[:, 1:], torch.full_like(out[:, 1:], 0.37), atol=1e-5)
    assert interpolate_pos_embed(constant, grid) is constant
    # Up then down keeps a smooth field close to itself.
    field = torch.stack([xs, ys] * 3, dim=-1).reshape(1, grid * grid, dim) / grid
    pos = torch.cat([torch.zeros(1, 1, dim), field], dim=1)
    back = interpolate_pos_embed(interpolate_pos_embed(pos, 8), grid)
    assert torch.allclose(back, pos, atol=0.05)
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(torch.zeros(1, 1 + 12, dim), 4)


@torch.no_grad()
def test_vision_tower_runs_at_another_image_size() -> None:
    torch.manual_seed(2)
    model = CLIP(_micro()).eval()
    out = model.encode_image(torch.randn(2, 3, 32, 32))  # trained grid 4x4, served 8x8
    assert out.shape == (2, 16) and torch.isfinite(out).all()


@torch.no_grad()
def test_image_embedding_depends_on_every_patch_and_on_position() -> None:
    torch.manual_seed(3)
    model = CLIP(_micro()).eval()
    x = torch.randn(1, 3, 16, 16)
    base = model.encode_image(x)
    y = x.clone()
    y[..., 12:, 12:] += 1.0  # only the last patch
    assert not torch.allclose(model.encode_image(y), base, atol=1e-4)
    swapped = x.clone()  # swap two patches: learned positions make the order matter
    swapped[..., :4, :4], swapped[..., 12:, 12:] = x[..., 12:, 12:], x[..., :4, :4]
    assert not torch.allclose(model.encode_image(swapped), base, atol=1e-4)


@pytest.mark.parametrize("grad", [False, True])
def test_cls_only_last_block_equals_the_full_computation(grad: bool) -> None:
    torch.manual_seed(4)
    model = CLIP(_micro(img_n_layers=3)).eval()
    vit = model.visual
    x = torch.randn(3, 3, 16, 16)
    with torch.set_grad_enabled(grad):
        tokens = vit.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = vit.norm_pre(torch.cat([vit.cls_token.expand(3, -1, -1), tokens], dim=1) + vit.pos_embed)
        for block in vit.blocks:
            tokens = block(tokens)
        full = vit.norm(tokens)[:, 0]
        assert torch.allclose(vit.forward_features(x), full, atol=1e-5)
        # A block asked for the first n queries returns exactly those rows of its full output.
        h = torch.randn(2, 10, 32)
        assert torch.allclose(vit.blocks[0](h, n_queries=3), vit.blocks[0](h)[:, :3], atol=1e-5)


@pytest.mark.parametrize("text_pos", ["rope", "learned"])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_eot_only_last_block_equals_the_full_block(text_pos: str, use_sdpa: bool) -> None:
    torch.manual_seed(5)
    model = CLIP(_micro(text_pos=text_pos, use_sdpa=use_sdpa)).train()  # dropout 0: train == eval numerics
    block = model.text.blocks[-1]
    x = torch.randn(4, 9, 32, requires_grad=True)
    pos = torch.tensor([0, 8, 3, 5])
    rope = (model.text.rope_cos, model.text.rope_sin) if text_pos == "rope" else None
    full = block(x, rope)[torch.arange(4), pos]
    at = block.forward_at(x, pos, rope)
    assert torch.allclose(at, full, atol=1e-5)
    (g_full,) = torch.autograd.grad(full.sum(), x)
    (g_at,) = torch.autograd.grad(at.sum(), x)
    assert torch.allclose(g_at, g_full, atol=1e-5)


# --------------------------------------------------------------------------- convolutional stem
@torch.no_grad()
def test_conv_stem_gives_the_patch_grid_and_its_flops_are_counted() -> None:
    torch.manual_seed(4)
    plain, conv = CLIP(_micro(img_size=32)).eval(), CLIP(_micro(img_size=32, img_stem="conv")).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = conv.visual.patch_embed(x)
    assert tokens.shape == plain.visual.patch_embed(x).shape == (2, 32, 8, 8)
    assert conv.encode_image(x).shape == (2, 16)
    # Stride-2 3x3 layers (16 -> 8 -> 4 px grids doubling channels), then a 1x1 to the width.
    convs = [m for m in conv.visual.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in convs] == [((3, 3), (2, 2), 16), ((3, 3), (2, 2), 32),
                                                                         ((1, 1), (1, 1), 32)]
    # FLOPs: the estimate differs from the plain patch embedding's by exactly the stem's multiply-adds.
    side, stem = 32, 0
    for c in convs:
        side //= c.stride[0]
        stem += 2 * side * side * c.out_channels * c.in_channels * c.kernel_size[0] * c.kernel_size[1]
    patch = 2 * 64 * 3 * 4 * 4 * 32
    assert conv.flops_per_image() - plain.flops_per_image() == stem - patch


def test_conv_stem_needs_a_power_of_two_patch() -> None:
    from model import ConfigError

    with pytest.raises(ConfigError, match="power-of-two patch_size"):
        _micro(img_size=24, patch_size=6, img_stem="conv")
    with pytest.raises(ConfigError, match="img_stem must be"):
        _micro(img_stem="resnet")


# --------------------------------------------------------------------------- late colour (ColourSplit)
def _isoluminant_pair(cfg: CLIPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalised images with the same luminance and colourfulness everywhere, in other hues."""
    from model.vision import _YCBCR

    to_ycc = torch.tensor(_YCBCR)
    raw = torch.tensor([0.6, 0.45, 0.3]).view(1, 3, 1, 1) + 0.1 * torch.rand(2, 3, cfg.img_size, cfg.img_size)
    ycc = torch.einsum("ij,bjhw->bihw", to_ycc, raw)
    ycc = torch.stack([ycc[:, 0], -ycc[:, 2], ycc[:, 1]], dim=1)  # hue turned by 90 degrees
    recoloured = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_ycc), ycc)
    assert 0.0 <= recoloured.min() and recoloured.max() <= 1.0
    mean, std = torch.tensor(cfg.image_mean).view(1, 3, 1, 1), torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    return (raw - mean) / std, (recoloured - mean) / std


@pytest.mark.parametrize("pool", ["mean", "cls"])
@torch.no_grad()
def test_late_colour_blocks_before_its_layer_see_no_hue(pool: str) -> None:
    torch.manual_seed(5)
    cfg = _micro(img_size=32, img_n_layers=3, img_color_layer=2, img_pool=pool)
    model = CLIP(cfg).eval()
    assert model.visual.patch_embed.in_channels == 2
    seen: list[torch.Tensor] = []
    model.visual.blocks[1].register_forward_hook(lambda _m, _i, out: seen.append(out))
    a, b = _isoluminant_pair(cfg)
    emb_a, emb_b = model.encode_image(a), model.encode_image(b)
    # Up to block 2 the tower cannot tell the two hues apart; from there on it can.
    assert torch.allclose(seen[0], seen[1], atol=1e-5)
    assert (emb_a - emb_b).abs().max() > 1e-3
    # An RGB tower of the same size tells them apart from its first block on.
    rgb = CLIP(cfg.replace(img_color_layer=None)).eval()
    seen.clear()
    rgb.visual.blocks[1].register_forward_hook(lambda _m, _i, out: seen.append(out))
    rgb.encode_image(a), rgb.encode_image(b)
    assert (seen[0] - seen[1]).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [0, 2])
@torch.no_grad()
def test_late_colour_token_of_a_patch_lands_on_that_patch(layer: int) -> None:
    torch.manual_seed(7)
    cfg = _micro(img_size=32, img_n_layers=3, img_color_layer=layer)  # 8 x 8 patches of 4 px
    model = CLIP(cfg).eval()
    seen: list[torch.Tensor] = []
    model.visual.blocks[layer].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    a, b = _isoluminant_pair(cfg)
    one = a[:1].clone()
    row, col = 2, 5
    one[..., 4 * row:4 * row + 4, 4 * col:4 * col + 4] = b[:1, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4]
    model.encode_image(a[:1]), model.encode_image(one)
    changed = ((seen[0] - seen[1]).abs().amax(dim=-1) > 1e-5).nonzero()[:, 1].tolist()
    assert changed == [1 + 8 * row + col]  # token 0 is CLS, which gets no colour


@torch.no_grad()
def test_late_colour_tokens_follow_the_conv_stem_grid_on_other_image_sides() -> None:
    torch.manual_seed(8)
    model = CLIP(_micro(img_size=32, img_stem="conv", img_color_layer=1)).eval()
    assert model.encode_image(torch.randn(2, 3, 34, 34)).shape == (2, 16)  # the stem pads up to a 9 x 9 grid


@torch.no_grad()
def test_late_colour_works_with_the_conv_stem_and_counts_its_flops() -> None:
    torch.manual_seed(6)
    for stem in ("patch", "conv"):
        rgb = CLIP(_micro(img_size=32, img_stem=stem))
        late = CLIP(_micro(img_size=32, img_stem=stem, img_color_layer=1))
        assert late.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 16)
        first = next(m for m in late.visual.patch_embed.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.in_channels == 2
        # The stem's first layer sees 2 channels instead of 3; one 3 -> width map per patch is added.
        k = first.kernel_size[0] * first.kernel_size[1]
        out_side = 32 // first.stride[0]
        stem_saving = 2 * out_side * out_side * 1 * k * first.out_channels
        assert rgb.flops_per_image() - late.flops_per_image() == stem_saving - 2 * 64 * 3 * 32


def test_late_colour_layer_is_validated() -> None:
    from model import ConfigError

    with pytest.raises(ConfigError, match="img_color_layer must name a block"):
        _micro(img_color_layer=2)  # two blocks: 0 or 1
    with pytest.raises(ConfigError, match="img_color_layer must name a block"):
        _micro(img_color_layer=-1)
    with pytest.raises(ConfigError, match="needs RGB images"):
        _micro(img_color_layer=0, channel=1, image_mean=[0.5], image_std=[0.25])
    with pytest.raises(ConfigError, match="img_color_layer must be of type"):
        _micro(img_color_layer="late")
