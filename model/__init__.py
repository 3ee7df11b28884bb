"""clipforge's CLIP: config, towers, loss, tokenizer, image preprocessing, checkpoints, inference, zero-shot.

Imports nothing else of clipforge; everything else builds on it.
"""

from .checkpoint import (
    content_hash,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    update_meta,
)
from .clip import CLIP
from .config import PRESETS, CLIPConfig, preset_config
from .errors import (
    CheckpointError,
    ClipforgeError,
    ConfigError,
    ImageError,
    ImageTooLargeError,
)
from .image import DEFAULT_MAX_PIXELS, ImageTransform, load_and_preprocess, open_image
from .inference import CLIPInference
from .loss import caption_groups, clip_loss
from .tokenizer import CLIPTokenizer
from .zeroshot import (
    DEFAULT_TEMPLATES,
    best_first,
    label_prompts,
    rank_labels,
    softmax_at_temperature,
    template_ensemble,
    templates_or_default,
    top_k_accuracy,
)

__all__ = [
    "CLIP",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_TEMPLATES",
    "PRESETS",
    "CLIPConfig",
    "CLIPInference",
    "CLIPTokenizer",
    "CheckpointError",
    "ClipforgeError",
    "ConfigError",
    "ImageError",
    "ImageTooLargeError",
    "ImageTransform",
    "best_first",
    "caption_groups",
    "clip_loss",
    "content_hash",
    "label_prompts",
    "load_and_preprocess",
    "load_checkpoint",
    "open_image",
    "preset_config",
    "rank_labels",
    "read_meta",
    "save_checkpoint",
    "softmax_at_temperature",
    "template_ensemble",
    "templates_or_default",
    "top_k_accuracy",
    "update_meta",
]
