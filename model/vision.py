"""The image tower: a Vision Transformer with a CLS token and learned positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .layers import Block


def interpolate_pos_embed(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize learned position embeddings (1, 1 + g*g, D) to a new patch grid, keeping CLS.

    Lets a checkpoint trained at one image size be used at another.
    """
    cls, patches = pos[:, :1], pos[:, 1:]
    old_grid = math.isqrt(patches.shape[1])
    if old_grid * old_grid != patches.shape[1]:
        raise ValueError(f"position embedding of {patches.shape[1]} patches is not a square grid")
    if old_grid == new_grid:
        return pos
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos.dtype)
    return torch.cat([cls, patches], dim=1)


def conv_stem_widths(dim: int, patch_size: int) -> list[int]:
    """Channels of the stride-2 layers (patch_size == 2**n): doubling up to the tower width."""
    n = patch_size.bit_length() - 1
    return [max(16, dim >> (n - i)) for i in range(1, n + 1)]


class ConvStem(nn.Sequential):
    """Patch embedding as a stack of 3x3 stride-2 convolutions (Xiao et al., 2021), then a 1x1 to the width.

    Small shared kernels learn an edge once for every offset inside a patch. Output grid and
    width equal the plain patch embedding's.
    """

    def __init__(self, channels: int, dim: int, patch_size: int) -> None:
        layers: list[nn.Module] = []
        c_in = channels
        for w in conv_stem_widths(dim, patch_size):
            layers += [nn.Conv2d(c_in, w, kernel_size=3, stride=2, padding=1), nn.GELU()]
            c_in = w
        layers.append(nn.Conv2d(c_in, dim, kernel_size=1))
        super().__init__(*layers)


# ITU-R BT.601 (JPEG's YCbCr): luminance, blue-difference and red-difference chroma.
_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


class ColourSplit(nn.Module):
    """Splits normalised RGB into a hue-free image for the stem and one colour token per patch.

    The stem sees luminance and chroma magnitude, so an outline looks alike in every hue and
    unseen colour-shape pairs compose; hue joins as each patch's mean YCbCr before a later
    block (docs/benchmarks.md, "Shapes, fourth round").
    """

    STEM_CHANNELS = 2  # luminance, chroma magnitude

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("ycbcr", torch.tensor(_YCBCR), persistent=False)
        self.colour = nn.Linear(3, cfg.img_dim)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stem's (B, 2, H, W) input, luminance and chroma magnitude at about unit range, and
        the (B, 3, H, W) YCbCr image that colour_tokens pools."""
        ycc = torch.einsum("ij,bjhw->bihw", self.ycbcr.to(pixels.dtype), pixels * self.std + self.mean)
        luma = (ycc[:, :1] - 0.45) / 0.25
        chroma = torch.hypot(ycc[:, 1:2], ycc[:, 2:3])  # how colourful, whatever the hue
        return torch.cat([luma, chroma / 0.15 - 1], dim=1), ycc

    def colour_tokens(self, ycc: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, D): each cell's mean Y, Cb, Cr (in [-0.5, 1]) on the stem's output grid, mapped to the width.

        Pooling to the grid the stem produced, rather than by patch size, keeps the tokens
        aligned for image sides that are not a multiple of the patch (the conv stem pads up)."""
        colour = F.adaptive_avg_pool2d(ycc, grid).flatten(2).transpose(1, 2)
        return self.colour(colour * 4)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.img_dim
        self.colour_split = ColourSplit(cfg) if cfg.img_color_layer is not None else None
        c_in = ColourSplit.STEM_CHANNELS if self.colour_split is not None else cfg.channel
        if cfg.img_stem == "conv":
            self.patch_embed: nn.Module = ConvStem(c_in, d, cfg.patch_size)
        else:
            self.patch_embed = nn.Conv2d(c_in, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.n_patches, d))
        self.drop = nn.Dropout(cfg.img_dropout_rate)
        # CLIP's ln_pre: patch embeddings, CLS and positions arrive at different scales.
        self.norm_pre = nn.LayerNorm(d, eps=cfg.eps)
        self.blocks = nn.ModuleList(
            Block(d, cfg.img_n_heads, mlp_ratio=cfg.img_mlp_ratio, dropout=cfg.img_dropout_rate, eps=cfg.eps,
                  causal=False, use_sdpa=cfg.use_sdpa, mlp_act=cfg.mlp_act)
            for _ in range(cfg.img_n_layers)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.eps)
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes else None

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled (B, img_dim) feature: the CLS token or the mean of the patch tokens."""
        if self.colour_split is None:
            x, colour = self.patch_embed(pixels), None
        else:
            stem_in, ycc = self.colour_split(pixels)
            x = self.patch_embed(stem_in)
            colour = F.pad(self.colour_split.colour_tokens(ycc, x.shape[-2:]), (0, 0, 1, 0))  # none for CLS
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = self.pos_embed
        if pos.shape[1] != x.shape[1]:  # another image size than trained on
            pos = interpolate_pos_embed(pos, math.isqrt(x.shape[1] - 1))
        x = self.norm_pre(self.drop(x + pos))
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if colour is not None and i == self.cfg.img_color_layer:
                x = x + colour
            if i == last and self.cfg.img_pool == "cls":
                # Only the CLS token is read, so the last block computes that one query (same result).
                return self.norm(block(x, n_queries=1))[:, 0]
            x = block(x)
        return self.norm(x)[:, 1:].mean(dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits when the ViT has a classification head, else pooled features."""
        feats = self.forward_features(pixels)
        return self.head(feats) if self.head is not None else feats
