"""Towers from transformers: any vision backbone with a pooled output, any BERT-style text encoder.

CLIP builds these when its config says `image_tower = "hf"` / `text_tower = "hf"`; the
backbone is rebuilt from the transformers config stored in the checkpoint's config.json
(random init, then the checkpoint's weights), so loading never reads a hub or a cache.
`read_image_tower` / `read_text_tower` take a transformers folder apart for `clipforge train
--image-tower hf:DIR --text-tower hf:DIR`: its config, its weights and (text) its tokenizer,
all from local files. transformers is imported here and only here within model/.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CheckpointError, ClipforgeError, ConfigError
from .text import eot_positions
from .tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from .config import CLIPConfig

# Where transformers backbones keep their sequence of blocks (the unit --unlock-last counts).
_BLOCK_PATHS = ("encoder.layer", "encoder.layers", "encoder.stages", "layers", "stages", "blocks")
# Keys a transformers config carries that describe the file, not the network.
_NOT_ARCHITECTURE = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
                     "_attn_implementation_autoset", "id2label", "label2id", "gradient_checkpointing", "use_cache")


def transformers_module() -> Any:
    """transformers, quiet, or one line saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise ClipforgeError("a transformers tower needs transformers: pip install 'clipforge[hf]'") from exc
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def build_backbone(tower_config: dict[str, Any], *, without_pooler: bool = False) -> nn.Module:
    """A randomly initialised transformers base model from the dict of its config; nothing is looked up."""
    transformers = transformers_module()
    values = dict(tower_config)
    model_type = values.pop("model_type")
    try:
        config = transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"transformers has no model type {model_type!r} or rejects its config: {exc}") from None
    if without_pooler:  # BERT's tanh pooler is never used: its weights would get no gradient (DDP refuses that)
        try:
            return transformers.AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            pass
    try:
        return transformers.AutoModel.from_config(config)
    except ValueError as exc:
        raise ConfigError(f"transformers has no base model for {model_type!r}: {exc}") from None


def block_list(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's blocks in order (BERT/ViT layers, ConvNeXt stages)."""
    for path in _BLOCK_PATHS:
        module: Any = backbone
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module):
            return module
    raise ConfigError(f"{type(backbone).__name__}: no sequence of blocks found (looked for {', '.join(_BLOCK_PATHS)})")


def output_width(config: Any) -> int:
    """The pooled feature width a transformers config promises (the last stage's for CNNs)."""
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    width = getattr(config, "hidden_size", None)
    if width is None:
        raise ConfigError(f"{config.model_type}: its config names no hidden_size or hidden_sizes")
    return int(width)


class HFImageTower(nn.Module):
    """A transformers vision backbone: (B, C, H, W) pixels -> (B, img_dim) pooled features."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.image_tower_config or {}, without_pooler=True)
        width = output_width(self.backbone.config)
        if width != cfg.img_dim:
            raise ConfigError(f"the {cfg.image_tower_config['model_type']} image tower outputs {width} features "
                              f"but img_dim is {cfg.img_dim}")
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(self.backbone.forward).parameters

    @property
    def blocks(self) -> nn.ModuleList:
        return block_list(self.backbone)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pooler_output where the backbone has one (ConvNeXt: normed spatial mean), else the CLS token
        of a token sequence (ViT), else the spatial mean."""
        extra = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.backbone(pixel_values=pixels, **extra)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            pooled = hidden[:, 0] if hidden.ndim == 3 else hidden.mean(dim=(-2, -1))
        return pooled.flatten(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_features(pixels)


class HFTextTower(nn.Module):
    """A BERT-style transformers encoder: (B, T) right-padded ids -> (B, text_dim), CLS or mean pooled.

    The tokens that count run from the start to the first end token (the same rule as
    clipforge's text tower), so the attention mask never depends on what the pad id is.
    """

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        tower_config = {**(cfg.text_tower_config or {}), "vocab_size": cfg.vocab_size,
                        "pad_token_id": cfg.pad_token_id}
        self.backbone = build_backbone(tower_config, without_pooler=True)
        width = output_width(self.backbone.config)
        if width != cfg.text_dim:
            raise ConfigError(f"the {tower_config['model_type']} text tower is {width} wide but text_dim is "
                              f"{cfg.text_dim}")

    @property
    def blocks(self) -> nn.ModuleList:
        return block_list(self.backbone)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        last = eot_positions(ids, self.cfg.eot_token_id, self.cfg.pad_token_id)
        if not ids.is_meta:  # meta tensors (shape checks) carry no values to trim by
            ids = ids[:, : int(last.max()) + 1]
        mask = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) <= last.unsqueeze(1)
        attention = None if ids.is_meta else mask.long()  # transformers' mask building reads values
        hidden = self.backbone(input_ids=ids, attention_mask=attention).last_hidden_state
        if self.cfg.text_pool == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


# --------------------------------------------------------------------------- reading a transformers folder
@dataclass
class PretrainedTower:
    """What a transformers folder gives a tower: its config (as stored in CLIPConfig), weights and width."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    width: int
    fields: dict[str, Any]  # CLIPConfig fields the folder decides (preprocessing, vocabulary, pooling)
    tokenizer: CLIPTokenizer | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _load_pretrained(src: Path, *, without_pooler: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """(config dict, base-model weights, transformers config) of a local folder; nothing is downloaded."""
    if not (src / "config.json").is_file():
        found = ", ".join(sorted(p.name for p in src.iterdir())[:8]) if src.is_dir() else "no such directory"
        raise CheckpointError(f"hf:{src} is not a transformers model folder (config.json missing; found {found})")
    transformers = transformers_module()
    kwargs = {"add_pooling_layer": False} if without_pooler else {}
    try:
        config = transformers.AutoConfig.from_pretrained(str(src), local_files_only=True)
        try:
            model = transformers.AutoModel.from_pretrained(str(src), local_files_only=True, **kwargs)
        except TypeError:
            model = transformers.AutoModel.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"hf:{src} cannot be loaded as a transformers model: {str(exc).splitlines()[0]}") from None
    values = {k: v for k, v in config.to_diff_dict().items() if k not in _NOT_ARCHITECTURE}
    values["model_type"] = config.model_type
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    return values, state, config


def read_image_tower(src_dir: str | Path) -> PretrainedTower:
    """A vision backbone folder (ConvNeXt, ViT, ...) with its preprocessor's mean and std, if it states them."""
    src = Path(src_dir)
    values, state, config = _load_pretrained(src, without_pooler=True)
    fields: dict[str, Any] = {}
    pre = src / "preprocessor_config.json"
    if pre.is_file():
        settings = _read_json(pre)
        for key in ("image_mean", "image_std"):
            if isinstance(settings.get(key), list):
                fields[key] = tuple(float(v) for v in settings[key])
    return PretrainedTower(values, state, output_width(config), fields)


def _text_pooling(src: Path) -> str:
    """sentence-transformers' pooling setting (1_Pooling/config.json) where the folder has one, else CLS."""
    pooling = src / "1_Pooling" / "config.json"
    if pooling.is_file():
        settings = _read_json(pooling)
        if settings.get("pooling_mode_mean_tokens"):
            return "mean"
        if settings.get("pooling_mode_cls_token"):
            return "cls"
        modes = [k for k, v in settings.items() if k.startswith("pooling_mode") and v]
        raise ConfigError(f"{pooling}: pooling {', '.join(modes) or 'none'} is not supported; clipforge pools "
                          "by CLS or mean")
    return "cls"


def read_tokenizer(src: Path, max_length: int) -> CLIPTokenizer:
    """The folder's own (fast) tokenizer, with its start/end/pad tokens: CLS, SEP and PAD for BERT."""
    transformers = transformers_module()
    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True, use_fast=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"hf:{src}: its tokenizer cannot be read: {str(exc).splitlines()[0]}") from None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    sot = hf_tok.cls_token or hf_tok.bos_token
    eot = hf_tok.sep_token or hf_tok.eos_token
    if backend is None or not (sot and eot and hf_tok.pad_token):
        raise ConfigError(f"hf:{src}: a text tower needs a fast tokenizer with start (CLS/BOS), end (SEP/EOS) "
                          "and pad tokens")
    try:
        return CLIPTokenizer.from_tokenizer_json(backend.to_str(), max_length, pad_token=hf_tok.pad_token,
                                                 sot_token=sot, eot_token=eot)
    except ValueError as exc:
        raise ConfigError(f"hf:{src}: its tokenizer cannot serve the text tower: {exc}") from None


def read_text_tower(src_dir: str | Path, max_seq_len: int) -> PretrainedTower:
    """A BERT-style encoder folder with its tokenizer, pooling and vocabulary; context up to max_seq_len."""
    src = Path(src_dir)
    values, state, config = _load_pretrained(src, without_pooler=True)
    context = min(max_seq_len, int(getattr(config, "max_position_embeddings", max_seq_len)))
    tokenizer = read_tokenizer(src, context)
    vocab_size = int(getattr(config, "vocab_size", tokenizer.vocab_size))
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"hf:{src}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary only {vocab_size}")
    values.pop("vocab_size", None)
    values.pop("pad_token_id", None)
    fields = {"vocab_size": vocab_size, "max_seq_len": context, "text_pool": _text_pooling(src),
              "pad_token_id": tokenizer.pad_id, "sot_token_id": tokenizer.sot_id, "eot_token_id": tokenizer.eot_id}
    return PretrainedTower(values, state, output_width(config), fields, tokenizer)


def load_tower_weights(tower: nn.Module, pretrained: PretrainedTower, *, name: str) -> None:
    """The folder's weights into a tower built from the same config; every backbone tensor must be there."""
    result = tower.backbone.load_state_dict(pretrained.state, strict=False)
    if result.missing_keys:
        raise CheckpointError(f"the pretrained {name} tower lacks {', '.join(result.missing_keys[:5])}")
