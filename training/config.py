"""The training configuration: one validated pydantic model, from a TOML file and/or CLI flags.

Precedence: built-in defaults < TOML file < command-line flags. Unknown keys are
refused (a typo must not silently train with a default). The resolved config is saved
into the run folder so a run can be resumed and reproduced.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from model import PRESETS, CLIPConfig, preset_config
from model.errors import ConfigError
from model.fileio import write_atomic

CONFIG_FILE = "train_config.json"
# Training settings a preset brings along (below the TOML file and flags): the liteCLIP recipe is
# batch 64, lr 2e-4 and Adam (AdamW without weight decay and with Adam's betas and eps is exactly
# Adam), 5 epochs.
RECIPES: dict[str, dict[str, Any]] = {
    "liteclip": {"batch_size": 64, "lr": 2e-4, "epochs": 5, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999,
                 "adam_eps": 1e-8},
}
# The model fields --set may change on a checkpoint given as init_checkpoint (the weights still fit).
INIT_CHECKPOINT_OVERRIDES = frozenset({"img_dropout_rate", "text_dropout_rate", "use_sdpa"})


class TrainConfig(BaseModel):
    """Every knob of a training run. Field docs double as the CLI help text."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to train
    preset: str = Field("tiny", description="model preset (see `clipforge model presets`)")
    model: dict[str, Any] = Field(default_factory=dict, description="CLIPConfig field overrides")
    init_checkpoint: str | None = Field(
        None, description="fine-tune: start from this checkpoint (e.g. one `clipforge model import` wrote); its "
        "architecture, tokenizer, context length and image preprocessing are kept and the preset is not used "
        "(only the dropout rates and use_sdpa may be changed with --set)",
    )
    image_tower: str | None = Field(
        None, description="hf:DIR: the image tower is this transformers vision backbone (ConvNeXt, ViT, ...; its "
        "pooled output, its preprocessor's mean/std), with its weights; the rest of the model follows the preset",
    )
    text_tower: str | None = Field(
        None, description="hf:DIR: the text tower is this transformers BERT-style encoder, with its weights and its "
        "own tokenizer (CLS pooling, or mean where the folder is a sentence-transformers model; --set text_pool= "
        "overrides); context = min(the preset's max_seq_len, its max_position_embeddings)",
    )
    lock_image: bool = Field(False, description="freeze the image tower (kept in eval mode); its projection into "
                             "the shared space still trains")
    lock_text: bool = Field(False, description="freeze the text tower (kept in eval mode); its projection into the "
                            "shared space still trains")
    unlock_last: int = Field(
        0, ge=0, description="with --lock-image/--lock-text: the last N blocks of each locked tower train, and with "
        "them what comes after the blocks (ln_post / the final norm; the projections always train)",
    )
    # tokenizer normalisation: applies when a run trains its tokenizer (not on --resume or init_checkpoint)
    tokenizer_lowercase: bool = Field(True, description="tokenizer lowercases text (off: 'Red' and 'red' differ)")
    tokenizer_nfc: bool = Field(
        True, description="tokenizer applies Unicode NFC, so composed and decomposed accents match"
    )
    tokenizer_collapse_whitespace: bool = Field(
        True, description="tokenizer collapses whitespace runs to one space and strips the ends"
    )
    # data
    data: str = Field(..., description="training data spec (csv:..., imagefolder:..., webdataset:..., shapes:..., or a path)")
    val_data: str | None = Field(None, description="validation data spec (default: a split of --data)")
    zeroshot_data: str | None = Field(None, description="labelled data spec for per-epoch zero-shot accuracy")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of images held out for validation")
    max_samples: int | None = Field(None, gt=0, description="use only the first N images (quick debugging runs)")
    samples_per_epoch: int | None = Field(
        None, gt=0, description="streamed (webdataset) data: samples in one epoch, all ranks together (open_clip's "
        "--train-num-samples); every rank and worker then reads an equal share, so with uneven shards no rank "
        "runs dry early, and epochs get a known length (max_steps no longer needed)",
    )
    max_val_samples: int | None = Field(2000, gt=0, description="cap on validation images evaluated per epoch")
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="fail above this share of unreadable images")
    train_augment: bool = Field(True, description="random resized crops for training images")
    hflip: bool = Field(False, description="random horizontal flips too (off by default: captions say left and right)")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes decoding images")
    # schedule
    out: str = Field(..., description="run folder (checkpoints, logs, plots)")
    seed: int = Field(0, description="seed for init, data order and augmentation")
    epochs: int = Field(10, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimiser steps (caps epochs)")
    batch_size: int = Field(128, gt=0, description="global contrastive batch (all ranks, all micro-batches)")
    accum_steps: int = Field(1, gt=0, description="micro-batches per step; features are cached so the loss sees the full batch")
    lr: float = Field(5e-4, gt=0.0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0.0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (matrices only)")
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.98, ge=0.0, lt=1.0)
    adam_eps: float = Field(1e-6, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="clip the global gradient norm (0 disables)")
    text_lr_scale: float = Field(
        1.0, gt=0.0, le=1.0,
        description="the text tower's (and its projection's) lr as a fraction of lr: < 1 helps captions that differ "
        "in one word, and keeps a pretrained tower's knowledge (--lock-text freezes it)",
    )
    image_lr_scale: float = Field(
        1.0, gt=0.0, le=1.0,
        description="the image tower's (and its projection's) lr as a fraction of lr (--lock-image freezes it)",
    )
    group_duplicate_captions: bool = Field(
        True, description="identical captions in a batch are positives of each other's images, not negatives"
    )
    max_minutes: float | None = Field(None, gt=0.0, description="wall-clock budget: the cosine decay also follows the "
                                      "elapsed share of it, and training stops at its end (not reproducible step for step)")
    # hardware
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the model")
    threads: int | None = Field(None, gt=0, description="CPU intra-op threads (default: torch's choice; 1 is much "
                                "faster on a machine shared with other busy processes)")
    deterministic: bool = Field(True, description="deterministic algorithms on CPU")
    # checkpoints and logs
    save_every: int = Field(0, ge=0, description="also save every N steps (0: only at the end of each epoch)")
    keep_checkpoints: int = Field(2, ge=0, description="numbered step checkpoints to keep")
    best_metric: str = Field("auto", description="validation metric that picks the best checkpoint (auto: zero-shot top-1 if labelled, else mean recall, else val loss)")
    eval_batch_size: int = Field(256, gt=0)
    log_every: int = Field(10, gt=0, description="steps between training log records")
    progress: bool = Field(True, description="show a progress bar")
    tensorboard: bool = Field(True, description="write TensorBoard scalars")
    plots: bool = Field(True, description="write PNG plots at the end")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of: {', '.join(PRESETS)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _preset_recipe(cls, values: Any) -> Any:
        """A preset's training recipe fills the settings the TOML file and flags leave unset."""
        if isinstance(values, dict) and values.get("preset") in RECIPES:
            return {**RECIPES[values["preset"]], **values}
        return values

    @field_validator("image_tower", "text_tower")
    @classmethod
    def _tower_folder(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("hf:"):
            raise ValueError(f"must be hf:DIR (a transformers model folder), got {v!r}")
        if not Path(v[3:]).is_dir():
            raise ValueError(f"{v[3:]} is not a directory")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by accum_steps ({self.accum_steps})")
        if self.lr < self.min_lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.unlock_last and not (self.lock_image or self.lock_text):
            raise ValueError("unlock_last counts the blocks of a locked tower: add lock_image and/or lock_text")
        if self.init_checkpoint is not None:
            if self.image_tower or self.text_tower:
                raise ValueError("init_checkpoint brings both towers; image_tower/text_tower build new ones: "
                                 "give one or the other")
            if not Path(self.init_checkpoint).is_dir():
                raise ValueError(f"init_checkpoint {self.init_checkpoint} is not a checkpoint directory")
            changed = sorted(set(self.model) - INIT_CHECKPOINT_OVERRIDES)
            if changed:
                raise ValueError(f"init_checkpoint keeps the checkpoint's architecture, so --set {', '.join(changed)} "
                                 f"cannot apply; only {', '.join(sorted(INIT_CHECKPOINT_OVERRIDES))} can change")
            return self
        self.model_cfg()  # raises on bad model overrides
        return self

    def model_cfg(self) -> CLIPConfig:
        """The model configuration: the preset with the [model] overrides applied."""
        return preset_config(self.preset, **self.model)

    def tokenizer_options(self) -> dict[str, bool]:
        """Normalisation keyword arguments for CLIPTokenizer.train."""
        return {"lowercase": self.tokenizer_lowercase, "nfc": self.tokenizer_nfc,
                "collapse_whitespace": self.tokenizer_collapse_whitespace}

    def save(self, run_dir: str | Path) -> Path:
        """Write train_config.json into the run folder (atomically: --resume reads it back)."""
        path = Path(run_dir) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.model_dump(), indent=2, sort_keys=True))
        return path


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        elif err["type"] == "missing":
            msg = "required setting is missing"
        parts.append(f"{loc}: {msg}")
    return "invalid training config: " + "; ".join(parts)


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Validate a dict into a TrainConfig, turning pydantic's report into one ConfigError line."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc)) from None
    except ConfigError as exc:
        raise ConfigError(f"invalid training config: {exc}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML file: top-level keys plus an optional [model] table."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """base updated with overrides; the [model] tables are merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if key == "model" and isinstance(value, dict) and isinstance(out.get("model"), dict):
            out["model"] = {**out["model"], **value}
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < TOML file < overrides (e.g. CLI flags that were given)."""
    values: dict[str, Any] = read_toml(path) if path else {}
    return build_config(merge(values, overrides or {}))


def load_saved_config(run_dir: str | Path) -> TrainConfig:
    """The config saved in a run folder (used by --resume)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {CONFIG_FILE}: not a clipforge run folder")
    try:
        return build_config(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None


def parse_model_override(text: str) -> tuple[str, Any]:
    """"img_dim=192" -> ("img_dim", 192): values parse as JSON when they can, else stay strings."""
    if "=" not in text:
        raise ConfigError(f"model override {text!r} must look like key=value (e.g. img_dim=192)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value
