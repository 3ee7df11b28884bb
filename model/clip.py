"""The assembled CLIP: two towers, projections to a shared space, a learnable temperature.

Plus the model's small utilities: weight init, parameter counts, optimizer groups,
FLOPs and MFU estimates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .text import TextTransformer
from .vision import ColourSplit, VisionTransformer, conv_stem_widths


def _image_tower(cfg: CLIPConfig) -> nn.Module:
    if cfg.image_tower == "hf":  # transformers is imported only where a config asks for it
        from .hf_towers import HFImageTower

        return HFImageTower(cfg)
    return VisionTransformer(cfg)


def _text_tower(cfg: CLIPConfig) -> nn.Module:
    if cfg.text_tower == "hf":
        from .hf_towers import HFTextTower

        return HFTextTower(cfg)
    return TextTransformer(cfg)


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = _image_tower(cfg)
        self.text = _text_tower(cfg)
        self.image_proj = nn.Linear(cfg.img_dim, cfg.align_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.align_dim, bias=False)
        # log of the inverse temperature, CLIP's parameterisation: exp() keeps it positive.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        # Towers that stay in eval mode when the model trains ("visual", "text"): locked ones, whose
        # dropout would only add noise to features that do not learn. Set by training; not saved.
        self.eval_towers: tuple[str, ...] = ()
        self._init_weights()

    def train(self, mode: bool = True) -> CLIP:
        """Train (or eval) mode, but the towers in eval_towers always in eval mode."""
        super().train(mode)
        for name in self.eval_towers:
            getattr(self, name).eval()
        return self

    def _init_weights(self) -> None:
        """OpenAI CLIP's width-scaled init: std = width^-0.5 for attention inputs, projections and
        the vision tokens, (2 width)^-0.5 for the MLP input, and residual outputs shrunk further by
        (2 layers)^-0.5; it suits the narrow CPU widths better than GPT-2's flat 0.02 (docs/benchmarks.md).
        transformers towers keep their own init (or their pretrained weights)."""
        cfg = self.cfg
        own = []
        if cfg.image_tower == "clipforge":
            own.append((self.visual, cfg.img_dim, cfg.img_n_layers))
        if cfg.text_tower == "clipforge":
            own.append((self.text, cfg.text_dim, cfg.text_n_layers))
        for tower, width, layers in own:
            std = width ** -0.5
            for block in tower.blocks:
                nn.init.normal_(block.attn.qkv.weight, std=std)
                nn.init.normal_(block.attn.proj.weight, std=std * (2 * layers) ** -0.5)
                nn.init.normal_(block.mlp.fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.proj.weight, std=std * (2 * layers) ** -0.5)
                for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
                    nn.init.zeros_(lin.bias)
        if cfg.image_tower == "clipforge":
            v = self.visual
            nn.init.normal_(v.cls_token, std=cfg.img_dim ** -0.5)
            nn.init.normal_(v.pos_embed, std=cfg.img_dim ** -0.5)
            if v.head is not None:
                nn.init.normal_(v.head.weight, std=cfg.img_dim ** -0.5)
                nn.init.zeros_(v.head.bias)
            # the patch embedding (and ColourSplit's colour map) keeps PyTorch's default (fan-in scaled) init, as in CLIP
        if cfg.text_tower == "clipforge":
            nn.init.normal_(self.text.tok_embed.weight, std=0.02)
            if self.text.pos_embed is not None:
                nn.init.normal_(self.text.pos_embed, std=0.01)
        nn.init.normal_(self.image_proj.weight, std=cfg.img_dim ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.text_dim ** -0.5)

    # ------------------------------------------------------------------ public API
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, C, H, W) normalised pixels -> (B, align_dim) embeddings."""
        feats = self.image_proj(self.visual.forward_features(pixels))
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, T) right-padded token ids -> (B, align_dim) embeddings."""
        if ids.shape[0] == 0:
            return ids.new_zeros((0, self.cfg.align_dim), dtype=self.text_proj.weight.dtype)
        feats = self.text_proj(self.text(ids))
        return F.normalize(feats, dim=-1) if normalize else feats

    def scale(self) -> torch.Tensor:
        """The logit scale exp(t), clamped so it never exceeds max_logit_scale."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-to-text and text-to-image logits, (B_img, B_txt) and its transpose."""
        img = self.encode_image(pixels)
        txt = self.encode_text(ids)
        logits = self.scale() * img @ txt.t()
        return logits, logits.t()

    @torch.no_grad()
    def similarity(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """For each image, a probability distribution over the given texts."""
        logits, _ = self.forward(pixels, ids)
        return logits.softmax(dim=-1)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the stored parameter too (called after each optimizer step)."""
        self.logit_scale.clamp_(0.0, math.log(self.cfg.max_logit_scale))

    # ------------------------------------------------------------------ utilities
    def num_params(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())
        image = count(self.visual) + self.image_proj.weight.numel()
        text = count(self.text) + self.text_proj.weight.numel()
        return {"image": image, "text": text, "total": count(self)}

    def param_groups(self, weight_decay: float, text_lr_scale: float = 1.0, image_lr_scale: float = 1.0) -> list[dict]:
        """AdamW groups: decay on matrices only; none on norms, biases, CLS, positions, temperature.

        Each group carries an "lr_scale" (the trainer multiplies its scheduled lr by it): the
        text tower and its projection get text_lr_scale, the image tower and its projection
        image_lr_scale, the temperature 1. A slower text tower keeps captions that differ in one
        word apart until the image tower has learned the difference; slower pretrained towers
        keep what they know while new projections learn. Frozen parameters are left out.
        """
        scales = {"image": image_lr_scale, "text": text_lr_scale, "shared": 1.0}
        groups: dict[tuple[bool, str], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim < 2 or name.endswith(("cls_token", "pos_embed")) or name == "logit_scale"
            tower = ("text" if name.startswith(("text.", "text_proj.")) else
                     "image" if name.startswith(("visual.", "image_proj.")) else "shared")
            groups.setdefault((not plain, tower), []).append(p)
        order = {"image": 0, "text": 1, "shared": 2}
        return [
            {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scales[tower]}
            for (decay, tower), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], order[kv[0][1]]))
        ]

    def flops_per_image(self) -> float:
        """Forward FLOPs of one image; NaN for a transformers tower (no estimate for arbitrary backbones)."""
        return estimate_image_flops(self.cfg) if self.cfg.image_tower == "clipforge" else math.nan

    def flops_per_text(self, seq_len: int | None = None) -> float:
        return estimate_text_flops(self.cfg, seq_len) if self.cfg.text_tower == "clipforge" else math.nan

    def estimate_mfu(self, samples_per_second: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation of a training run: 3x forward FLOPs (fwd + bwd) / peak."""
        per_sample = 3 * (self.flops_per_image() + self.flops_per_text(seq_len))
        return per_sample * samples_per_second / peak_flops


# Dense bf16 peak FLOP/s of common accelerators, for the MFU estimate.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU, else None (no MFU figure on CPUs or unknown cards)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _tower_flops(tokens: int, dim: int, layers: int, mlp_ratio: float, kv_frac: float = 1.0) -> float:
    """Forward FLOPs (2 per multiply-add) of a transformer stack on one sequence."""
    qkv = 2 * tokens * dim * dim * (1 + 2 * kv_frac)
    proj = 2 * tokens * dim * dim
    mlp = 2 * 2 * tokens * dim * int(dim * mlp_ratio)
    attn = 2 * 2 * tokens * tokens * dim
    return layers * (qkv + proj + mlp + attn)


def estimate_image_flops(cfg: CLIPConfig) -> float:
    tokens = cfg.n_patches + 1
    channels, colour = cfg.channel, 0
    if cfg.img_color_layer is not None:
        # ColourSplit: a narrower stem input, and the map of each patch's mean colour to the width;
        # its per-pixel YCbCr arithmetic (a few dozen FLOPs a pixel) is left out, under 0.1% of any tower.
        channels, colour = ColourSplit.STEM_CHANNELS, 2 * cfg.n_patches * 3 * cfg.img_dim
    if cfg.img_stem == "conv":
        patch, c_in, side = 0, channels, cfg.img_size
        for w in conv_stem_widths(cfg.img_dim, cfg.patch_size):
            side //= 2
            patch += 2 * side * side * 9 * c_in * w
            c_in = w
        patch += 2 * cfg.n_patches * c_in * cfg.img_dim
    else:
        patch = 2 * cfg.n_patches * channels * cfg.patch_size**2 * cfg.img_dim
    tower = _tower_flops(tokens, cfg.img_dim, cfg.img_n_layers, cfg.img_mlp_ratio)
    return patch + colour + tower + 2 * cfg.img_dim * cfg.align_dim


def estimate_text_flops(cfg: CLIPConfig, seq_len: int | None = None) -> float:
    t = seq_len or cfg.max_seq_len
    kv_frac = cfg.text_n_kv_heads / cfg.text_n_heads
    tower = _tower_flops(t, cfg.text_dim, cfg.text_n_layers, cfg.text_mlp_ratio, kv_frac)
    return tower + 2 * cfg.text_dim * cfg.align_dim
