"""clipforge's CLIP: config, towers, loss, tokenizer, image preprocessing, checkpoints, inference.

Imports nothing else of clipforge; everything else builds on it.
"""

from .checkpoint import content_hash, load_checkpoint, read_meta, save_checkpoint, update_meta
from .clip import CLIP
from .config import PRESETS, CLIPConfig, preset_config
from .errors import CheckpointError, ClipforgeError, ConfigError, ImageError, ImageTooLargeError
from .image import DEFAULT_MAX_PIXELS, ImageTransform, load_and_preprocess, open_image
from .inference import DEFAULT_TEMPLATES, CLIPInference
from .loss import caption_groups, clip_loss
from .tokenizer import CLIPTokenizer

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
    "caption_groups",
    "clip_loss",
    "content_hash",
    "load_and_preprocess",
    "load_checkpoint",
    "open_image",
    "preset_config",
    "read_meta",
    "save_checkpoint",
    "update_meta",
]
