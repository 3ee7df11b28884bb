"""The model configuration: one validated dataclass and the named presets.

Every hyperparameter of the architecture lives here so a checkpoint's `config.json`
is enough to rebuild the model exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from .errors import ConfigError

# The dtypes inference can run in (CLIPInference, serve --precision, index build --precision).
Precision = Literal["fp32", "bf16"]
PRECISION_NAMES: tuple[str, ...] = get_args(Precision)

MLP_ACTIVATIONS = ("gelu", "quick_gelu")
IMAGE_RESIZES = ("crop_box", "shortest_edge")
# Where "shortest_edge"'s centre crop starts on an axis with margin m = dim - img_size: "floor", m // 2
# (transformers' CLIPImageProcessor); "round", int(round(m / 2)) with Python's half-to-even rounding
# (torchvision's CenterCrop, so open_clip's eval transform). They differ by one pixel where m is odd.
IMAGE_CROP_OFFSETS = ("floor", "round")
# "clipforge": the ViT / causal text transformer of this package; "hf": a transformers backbone
# (model/hf_towers.py) rebuilt from the *_tower_config dict stored in config.json.
TOWER_KINDS = ("clipforge", "hf")
HF_TEXT_POOLS = ("cls", "mean")
# Fields config.json leaves out at these defaults, so such checkpoints stay byte-identical to (and
# readable by) versions from before pretrained towers and the rounded crop offset.
_OMITTED_AT_DEFAULT = {"image_tower": "clipforge", "image_tower_config": None, "text_tower": "clipforge",
                       "text_tower_config": None, "text_pool": "eot", "image_crop_offset": "floor"}
# Field names older checkpoints wrote, and their current names.
_RENAMED_FIELDS = {"is_flash": "use_sdpa"}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPConfig:
    # shared
    eps: float = 1e-6  # every LayerNorm's epsilon (OpenAI/transformers CLIP: 1e-5)
    use_sdpa: bool = True  # F.scaled_dot_product_attention; False selects the plain math path
    mlp_act: str = "gelu"  # both towers' MLP activation: "gelu" (exact, erf) or "quick_gelu" (OpenAI CLIP)
    align_dim: int = 512
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    # image tower (ViT)
    img_size: int = 224
    patch_size: int = 16
    channel: int = 3
    img_dim: int = 384
    img_n_heads: int = 6
    img_n_layers: int = 12
    img_mlp_ratio: float = 4.0
    img_dropout_rate: float = 0.0
    img_pool: str = "cls"  # "cls" or "mean"
    img_stem: str = "patch"  # "patch" (one patch-sized convolution) or "conv" (3x3 stride-2 stack)
    # None: the stem sees RGB. k: the stem sees luminance and chroma magnitude (no hue) and
    # each patch's mean colour joins the tokens before block k (model/vision.py, ColourSplit).
    img_color_layer: int | None = None
    num_classes: int | None = None  # optional classification head on the pooled image feature
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    # Evaluation resize. "crop_box": the centred square resized to img_size in one bicubic step.
    # "shortest_edge": transformers' CLIPImageProcessor (short side to image_resize_size, bicubic,
    # then an img_size centre crop), what imported models were trained with.
    image_resize: str = "crop_box"
    image_resize_size: int | None = None  # "shortest_edge" only; None means img_size
    image_crop_offset: str = "floor"  # "shortest_edge" only: IMAGE_CROP_OFFSETS ("round": open_clip's)
    # Which towers: "clipforge" (below) or "hf", a transformers backbone built from the dict of its
    # transformers config (model_type and its fields; random init, weights come from the checkpoint).
    # An "hf" image tower pools its backbone's output (pooler_output, else the CLS token, else the spatial
    # mean) and its width must be img_dim; an "hf" text tower pools at text_pool ("cls" or "mean" over the
    # tokens up to the end token), its width is text_dim and its vocabulary vocab_size.
    image_tower: str = "clipforge"
    image_tower_config: dict[str, Any] | None = None
    text_tower: str = "clipforge"
    text_tower_config: dict[str, Any] | None = None
    text_pool: str = "eot"  # "eot" for the clipforge text tower; "cls" or "mean" for an "hf" one
    # text tower (GPT-style, causal)
    vocab_size: int = 6400
    max_seq_len: int = 64
    text_dim: int = 768
    text_n_heads: int = 12
    text_n_kv_heads: int = 3
    text_n_layers: int = 12
    text_mlp_ratio: float = 4.0
    text_dropout_rate: float = 0.0
    text_pos: str = "rope"  # "rope" or "learned"
    rope_theta: float = 10000.0
    pad_token_id: int = 0
    sot_token_id: int = 1
    eot_token_id: int = 2

    def __post_init__(self) -> None:
        try:
            self.image_mean = tuple(float(v) for v in self.image_mean)
            self.image_std = tuple(float(v) for v in self.image_std)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"image_mean and image_std must be lists of numbers: {exc}") from exc
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        self._check_types()

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")

        for name in (
            "eps", "align_dim", "img_size", "patch_size", "channel", "img_dim", "img_n_heads",
            "img_n_layers", "img_mlp_ratio", "vocab_size", "max_seq_len", "text_dim",
            "text_n_heads", "text_n_kv_heads", "text_n_layers", "text_mlp_ratio", "rope_theta",
            "init_temperature", "max_logit_scale",
        ):
            positive(name)
        for name in ("img_dropout_rate", "text_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        self._check_towers()
        if self.image_tower == "clipforge":
            self._check_vit()
        if self.text_tower == "clipforge":
            self._check_text_transformer()
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ConfigError(f"mlp_act must be one of {', '.join(map(repr, MLP_ACTIVATIONS))}, got {self.mlp_act!r}")
        if self.image_resize not in IMAGE_RESIZES:
            raise ConfigError(
                f"image_resize must be one of {', '.join(map(repr, IMAGE_RESIZES))}, got {self.image_resize!r}"
            )
        if self.image_resize_size is not None:
            if self.image_resize != "shortest_edge":
                raise ConfigError("image_resize_size is only used with image_resize 'shortest_edge'; set it to null")
            if self.image_resize_size < self.img_size:
                raise ConfigError(
                    f"image_resize_size ({self.image_resize_size}) must be at least img_size ({self.img_size}), "
                    "the centre crop's side"
                )
        if self.image_crop_offset not in IMAGE_CROP_OFFSETS:
            raise ConfigError(f"image_crop_offset must be one of {', '.join(map(repr, IMAGE_CROP_OFFSETS))}, "
                              f"got {self.image_crop_offset!r}")
        if self.image_crop_offset != "floor" and self.image_resize != "shortest_edge":
            raise ConfigError("image_crop_offset is only used with image_resize 'shortest_edge' (the centred "
                              "square of 'crop_box' has no offset to round); set it to 'floor'")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes <= 0):
            raise ConfigError(f"num_classes must be a positive integer or null, got {self.num_classes!r}")
        if len(self.image_mean) != self.channel or len(self.image_std) != self.channel:
            raise ConfigError(f"image_mean and image_std need {self.channel} values (one per channel)")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError("image_std values must be positive")
        if self.max_seq_len < 3:
            raise ConfigError("max_seq_len must leave room for start, end and one token (>= 3)")
        ids = {self.pad_token_id, self.sot_token_id, self.eot_token_id}
        if len(ids) != 3 or any(not 0 <= i < self.vocab_size for i in ids):
            raise ConfigError("pad, sot and eot token ids must be distinct and below vocab_size")

    def _check_vit(self) -> None:
        """What clipforge's own image tower needs of its fields."""
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})")
        if self.img_dim % self.img_n_heads:
            raise ConfigError(f"img_dim ({self.img_dim}) must be divisible by img_n_heads ({self.img_n_heads})")
        if self.img_pool not in ("cls", "mean"):
            raise ConfigError(f"img_pool must be 'cls' or 'mean', got {self.img_pool!r}")
        if self.img_stem not in ("patch", "conv"):
            raise ConfigError(f"img_stem must be 'patch' or 'conv', got {self.img_stem!r}")
        if self.img_stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(f"img_stem 'conv' needs a power-of-two patch_size >= 2, got {self.patch_size}")
        if self.img_color_layer is not None:
            if not 0 <= self.img_color_layer < self.img_n_layers:
                raise ConfigError(
                    f"img_color_layer must name a block, 0 to img_n_layers - 1 ({self.img_n_layers - 1}), "
                    f"or be null, got {self.img_color_layer}"
                )
            if self.channel != 3:
                raise ConfigError(f"img_color_layer needs RGB images (channel = 3), got channel = {self.channel}")

    def _check_text_transformer(self) -> None:
        """What clipforge's own text tower needs of its fields."""
        if self.text_dim % self.text_n_heads:
            raise ConfigError(f"text_dim ({self.text_dim}) must be divisible by text_n_heads ({self.text_n_heads})")
        if self.text_n_heads % self.text_n_kv_heads:
            raise ConfigError(
                f"text_n_heads ({self.text_n_heads}) must be divisible by text_n_kv_heads ({self.text_n_kv_heads})"
            )
        if self.text_pos not in ("rope", "learned"):
            raise ConfigError(f"text_pos must be 'rope' or 'learned', got {self.text_pos!r}")
        if self.text_pos == "rope" and (self.text_dim // self.text_n_heads) % 2:
            raise ConfigError("rotary embeddings need an even head dimension (text_dim / text_n_heads)")

    def _check_towers(self) -> None:
        for side in ("image", "text"):
            kind, tower_cfg = getattr(self, f"{side}_tower"), getattr(self, f"{side}_tower_config")
            if kind not in TOWER_KINDS:
                raise ConfigError(f"{side}_tower must be one of {', '.join(map(repr, TOWER_KINDS))}, got {kind!r}")
            if kind == "clipforge" and tower_cfg is not None:
                raise ConfigError(f"{side}_tower_config is only for {side}_tower 'hf'; set it to null")
            if kind == "hf" and not (isinstance(tower_cfg, dict) and isinstance(tower_cfg.get("model_type"), str)):
                raise ConfigError(f"{side}_tower 'hf' needs {side}_tower_config: a transformers config as a mapping "
                                  "with its model_type")
        if self.text_tower == "clipforge" and self.text_pool != "eot":
            raise ConfigError(f"text_pool {self.text_pool!r} is for a transformers text tower; clipforge's pools at "
                              "the end-of-text token ('eot')")
        if self.text_tower == "hf":
            if self.text_pool not in HF_TEXT_POOLS:
                raise ConfigError(f"text_pool must be one of {', '.join(map(repr, HF_TEXT_POOLS))} for a "
                                  f"transformers text tower, got {self.text_pool!r}")
            tower = self.text_tower_config or {}
            if tower.get("vocab_size", self.vocab_size) != self.vocab_size:
                raise ConfigError(f"text_tower_config vocab_size {tower['vocab_size']} differs from vocab_size "
                                  f"{self.vocab_size}; vocab_size is the one that counts")
            if tower.get("max_position_embeddings", self.max_seq_len) < self.max_seq_len:
                raise ConfigError(f"max_seq_len {self.max_seq_len} exceeds the text tower's max_position_embeddings "
                                  f"{tower['max_position_embeddings']}")
        if self.image_tower == "hf":
            for name in ("img_color_layer", "num_classes"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} is for clipforge's image tower; a transformers one takes none")
        for side, rate in (("img", self.img_dropout_rate), ("text", self.text_dropout_rate)):
            tower = "image" if side == "img" else "text"
            if getattr(self, f"{tower}_tower") == "hf" and rate:
                raise ConfigError(f"{side}_dropout_rate is for clipforge's {tower} tower; a transformers tower "
                                  f"takes its dropout from {tower}_tower_config (e.g. hidden_dropout_prob, "
                                  "drop_path_rate)")

    def _check_types(self) -> None:
        """Reject wrong JSON types (a float width, a string depth) before they reach torch."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = str(f.type)
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind.startswith("int"):
                ok = (isinstance(value, int) and not isinstance(value, bool)) or (value is None and "None" in kind)
            elif kind == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind == "str":
                ok = isinstance(value, str)
            else:  # tuple[float, ...]: converted in __post_init__
                ok = True
            if not ok:
                raise ConfigError(f"{f.name} must be of type {kind}, got {value!r}")

    # ------------------------------------------------------------------ (de)serialisation
    @property
    def n_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        for key, default in _OMITTED_AT_DEFAULT.items():
            if data[key] == default:
                del data[key]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a mapping, got {type(data).__name__}")
        data = {_RENAMED_FIELDS.get(k, k): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc

    def replace(self, **changes: Any) -> CLIPConfig:
        return self.from_dict({**self.to_dict(), **changes})


def _preset(width: int, heads: int, layers: int, **kw: Any) -> dict[str, Any]:
    """Both towers at one width and depth, as the classic size ladder does."""
    base = {
        "img_dim": width, "img_n_heads": heads, "img_n_layers": layers,
        "text_dim": width, "text_n_heads": heads, "text_n_kv_heads": heads, "text_n_layers": layers,
        "align_dim": width,
    }
    base.update(kw)
    return base


# ConvNeXt-tiny (Liu et al., 2022) as transformers' ConvNextConfig; drop_path_rate 0.1 is the paper's setting
# for the tiny model. With ImageNet's mean and std, which ConvNeXt weights expect.
CONVNEXT_TINY: dict[str, Any] = {
    "model_type": "convnext", "num_channels": 3, "patch_size": 4, "num_stages": 4,
    "hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3], "hidden_act": "gelu", "initializer_range": 0.02,
    "layer_norm_eps": 1e-12, "layer_scale_init_value": 1e-6, "drop_path_rate": 0.1, "image_size": 224,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A 4-layer, 256-wide BERT encoder (BERT-mini's shape) with BERT's dropout 0.1.
BERT_4L_256: dict[str, Any] = {
    "model_type": "bert", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "intermediate_size": 1024, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 128, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "initializer_range": 0.02,
}

PRESETS: dict[str, dict[str, Any]] = {
    # GQA text towers with half as many kv heads as query heads, 224 px patch 16.
    "tiny": _preset(256, 4, 6, text_n_kv_heads=2, align_dim=256),
    "small": _preset(384, 6, 8, text_n_kv_heads=3, align_dim=384),
    "base": _preset(512, 8, 12, text_n_kv_heads=4),
    "large": _preset(768, 12, 24, text_n_kv_heads=4, align_dim=768, max_seq_len=77),
    "thinkclip": {
        "img_size": 224, "patch_size": 16, "img_dim": 384, "img_n_heads": 6, "img_n_layers": 12,
        "vocab_size": 6400, "max_seq_len": 64, "text_dim": 768, "text_n_heads": 12, "text_n_kv_heads": 3,
        "text_n_layers": 12, "align_dim": 512,
    },
    "vit-b-16": {
        "img_size": 224, "patch_size": 16, "img_dim": 768, "img_n_heads": 12, "img_n_layers": 12,
        "vocab_size": 49408, "max_seq_len": 77, "text_dim": 512, "text_n_heads": 8, "text_n_kv_heads": 8,
        "text_n_layers": 8, "text_pos": "learned", "align_dim": 512,
    },
    # Small-image variants so CPU training on 32-64 px data is practical.
    "mini-32": _preset(128, 4, 4, img_size=32, patch_size=4, max_seq_len=32, align_dim=128, text_n_kv_heads=2),
    "tiny-32": _preset(256, 4, 6, img_size=32, patch_size=4, max_seq_len=32, align_dim=256, text_n_kv_heads=2),
    "small-32": _preset(384, 6, 8, img_size=32, patch_size=4, max_seq_len=32, align_dim=384, text_n_kv_heads=3),
    "mini-64": _preset(128, 4, 4, img_size=64, patch_size=8, max_seq_len=32, align_dim=128, text_n_kv_heads=2),
    "tiny-64": _preset(256, 4, 6, img_size=64, patch_size=8, max_seq_len=48, align_dim=256, text_n_kv_heads=2),
    # The synthetic-shapes model of the demo and bench/quality_bench.py: mini-64, shallower, mean pooling,
    # colour joining before the last image block.
    "shapes-64": _preset(128, 4, 4, img_size=64, patch_size=8, max_seq_len=32, align_dim=128, text_n_kv_heads=2,
                         img_n_layers=3, text_n_layers=2, img_pool="mean", vocab_size=512, img_color_layer=2),
    # The liteCLIP design: pretrained-style towers from transformers (randomly initialised here; `clipforge train
    # --image-tower hf:DIR --text-tower hf:DIR` loads weights), 256-d embeddings, 128 tokens. Its training
    # recipe (batch 64, lr 2e-4, Adam, 5 epochs) is training/config.py's RECIPES["liteclip"].
    "liteclip": {
        "image_tower": "hf", "image_tower_config": CONVNEXT_TINY, "img_dim": 768, "img_size": 224,
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
        "text_tower": "hf", "text_tower_config": BERT_4L_256, "text_dim": 256, "text_pool": "cls",
        "max_seq_len": 128, "align_dim": 256,
    },
}


def preset_config(name: str, **overrides: Any) -> CLIPConfig:
    """The config of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return CLIPConfig.from_dict({**copy.deepcopy(PRESETS[name]), **overrides})
