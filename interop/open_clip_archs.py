"""What the open_clip importer knows of open_clip: its file names, CLIP's BPE constants and the
standard ViT configs (for bare state dicts given with --arch), and the one error it raises.
"""

from __future__ import annotations

from typing import Any

from model.errors import ClipforgeError

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

# open_clip 3.3.0's standard ViT CLIP configs (model_configs/*.json):
# embed_dim, image_size, patch_size, vision width, layers, head_width, mlp_ratio, text width, heads, layers.
_VIT_CONFIGS: dict[str, tuple[int, int, int, int, int, int, float, int, int, int]] = {
    "ViT-B-32": (512, 224, 32, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-32-256": (512, 256, 32, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-16": (512, 224, 16, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-16-plus-240": (640, 240, 16, 896, 12, 64, 4.0, 640, 10, 12),
    "ViT-L-14": (768, 224, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-L-14-336": (768, 336, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-H-14": (1024, 224, 14, 1280, 32, 80, 4.0, 1024, 16, 24),
    "ViT-g-14": (1024, 224, 14, 1408, 40, 88, 4.3637, 1024, 16, 24),
    "ViT-bigG-14": (1280, 224, 14, 1664, 48, 104, 4.9231, 1280, 20, 32),
}
_QUICKGELU_VARIANTS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14")


def _arch_config(name: str, numbers: tuple, quick_gelu: bool) -> dict[str, Any]:
    embed, image, patch, v_width, v_layers, head_width, mlp_ratio, t_width, t_heads, t_layers = numbers
    vision: dict[str, Any] = {"image_size": image, "layers": v_layers, "width": v_width, "patch_size": patch}
    if head_width != 64:
        vision["head_width"] = head_width
    if mlp_ratio != 4.0:
        vision["mlp_ratio"] = mlp_ratio
    cfg: dict[str, Any] = {"embed_dim": embed}
    if quick_gelu:
        cfg["quick_gelu"] = True
    cfg["vision_cfg"] = vision
    cfg["text_cfg"] = {"context_length": CONTEXT_LENGTH, "vocab_size": VOCAB_SIZE, "width": t_width,
                       "heads": t_heads, "layers": t_layers}
    return cfg


ARCHS: dict[str, dict[str, Any]] = {
    **{name: _arch_config(name, nums, False) for name, nums in _VIT_CONFIGS.items()},
    **{f"{name}-quickgelu": _arch_config(name, _VIT_CONFIGS[name], True) for name in _QUICKGELU_VARIANTS},
}
SUPPORTED = (
    "open_clip ViT CLIPs with open_clip's own text transformer and CLIP's BPE tokenizer "
    f"(--arch one of {', '.join(ARCHS)}; or a hub folder whose open_clip_config.json describes such a model)"
)


class OpenClipError(ClipforgeError, ValueError):
    """An open_clip source that cannot be read or does not map onto a transformers CLIP."""

