"""Where a run's model and tokenizer come from, and the wrappers the model trains in.

A new run trains its byte-level BPE tokenizer here (`train_tokenizer`), once, on rank 0,
on the captions of its training data only (`tokenizer_captions`): every caption of every
training record, after the validation split has been taken out, so validation and
zero-shot captions never shape the vocabulary; for streamed (webdataset) shards, the
first TOKENIZER_SHARD_CAPTIONS captions in stored order. The vocabulary size and context
length are the model config's, the normalisation the config's tokenizer_* settings. It
is saved as RUN/tokenizer.json, which the other ranks load. The initial weights come from
cfg.seed alone, so they are the same on every rank and in every rerun.

A resumed run, or one given init_checkpoint (fine-tuning), takes model and tokenizer from
that checkpoint instead and trains no tokenizer: an imported CLIP keeps its BPE, context
length and image preprocessing, which are all in the checkpoint's config and tokenizer. A
run with a pretrained text tower (text_tower = hf:DIR) takes that folder's tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from model import CLIP, CLIPConfig, CLIPTokenizer, ImageTransform, load_checkpoint
from model.checkpoint import model_origin
from model.errors import ConfigError

from .config import TrainConfig
from .distributed import DistInfo, barrier
from .run_data import RunData
from .step import ContrastiveModule

if TYPE_CHECKING:
    from model.hf_towers import PretrainedTower

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_SHARD_CAPTIONS = 200_000


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tokenizer_captions(run: RunData) -> list[str]:
    """The captions a new run's tokenizer is trained on: the training records' (or the shards' first ones)."""
    if run.streamed:
        return _shard_captions(run.shards, limit=TOKENIZER_SHARD_CAPTIONS)
    return [caption for record in run.train_records for caption in record.captions]


def _shard_captions(path: str, limit: int) -> list[str]:
    """Captions from the first shards, enough to train the tokenizer without reading every image."""
    from training.data import ShardDataset

    out: list[str] = []
    unused_transform = ImageTransform(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # raw samples are never decoded
    shards = ShardDataset(path, unused_transform, shuffle=False, rank=0, world_size=1)
    for sample in shards.raw_samples():
        if sample is not None and sample.captions:
            out.extend(sample.captions)
            if len(out) >= limit:
                break
    return out


def train_tokenizer(cfg: TrainConfig, captions: Iterable[str], *, model_cfg: CLIPConfig | None = None) -> CLIPTokenizer:
    """The tokenizer a new run trains on its captions: the model's vocab and context, the config's normalisation."""
    model_cfg = model_cfg or cfg.model_cfg()
    return CLIPTokenizer.train(captions, vocab_size=model_cfg.vocab_size, max_length=model_cfg.max_seq_len,
                               **cfg.tokenizer_options())


@dataclass
class RunModel:
    """A run's model (train mode, CPU), its tokenizer, and where its weights came from (for meta.json)."""

    model: CLIP
    tokenizer: CLIPTokenizer
    origin: dict[str, Any] = field(default_factory=dict)


@dataclass
class PretrainedTowers:
    """The transformers folders a new run's towers come from (model/hf_towers.py), read once."""

    image: PretrainedTower | None = None
    text: PretrainedTower | None = None

    @classmethod
    def read(cls, cfg: TrainConfig, model_cfg: CLIPConfig) -> PretrainedTowers:
        if not (cfg.image_tower or cfg.text_tower):
            return cls()
        from model.hf_towers import read_image_tower, read_text_tower

        image = read_image_tower(cfg.image_tower[3:]) if cfg.image_tower else None
        text = read_text_tower(cfg.text_tower[3:], model_cfg.max_seq_len) if cfg.text_tower else None
        return cls(image, text)

    def model_config(self, model_cfg: CLIPConfig, overrides: dict[str, Any]) -> CLIPConfig:
        """The preset's config with the pretrained towers in place; explicit --set values still win."""
        changes: dict[str, Any] = {}
        if self.image is not None:
            changes.update(image_tower="hf", image_tower_config=self.image.config, img_dim=self.image.width,
                           **_unless_set(self.image.fields, overrides),
                           **_unless_set({"img_color_layer": None, "num_classes": None, "img_dropout_rate": 0.0},
                                         overrides))
        if self.text is not None:
            changes.update(text_tower="hf", text_tower_config=self.text.config, text_dim=self.text.width,
                           **self.text.fields, **_unless_set({"text_dropout_rate": 0.0}, overrides))
            if "text_pool" in overrides:
                changes["text_pool"] = overrides["text_pool"]
        return model_cfg.replace(**changes) if changes else model_cfg

    def load_into(self, model: CLIP) -> None:
        from model.hf_towers import load_tower_weights

        if self.image is not None:
            load_tower_weights(model.visual, self.image, name="image")
        if self.text is not None:
            load_tower_weights(model.text, self.text, name="text")

    def origin(self, cfg: TrainConfig) -> dict[str, Any]:
        towers = {side: spec for side, spec in (("image", cfg.image_tower), ("text", cfg.text_tower)) if spec}
        return {"pretrained_towers": towers} if towers else {}


def _unless_set(fields: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in overrides}


def _from_checkpoint(cfg: TrainConfig, checkpoint: Path, *, fine_tune: bool) -> RunModel:
    """A resumed run's model as saved; a fine-tuned one with the allowed --set changes (dropout, use_sdpa)."""
    model, tokenizer, meta = load_checkpoint(checkpoint, device="cpu")
    origin = model_origin(meta)
    if fine_tune:
        origin["fine_tuned_from"] = {"checkpoint": str(checkpoint), "content_hash": meta.get("content_hash")}
        if cfg.model:
            changed = CLIP(model.cfg.replace(**cfg.model))
            changed.load_state_dict(model.state_dict(), strict=True)
            model = changed
    model.train()
    return RunModel(model, tokenizer, origin)


def build_model_and_tokenizer(
    cfg: TrainConfig, run: RunData, *, run_dir: Path, info: DistInfo, resume_from: Path | None = None,
) -> RunModel:
    """The run's model and tokenizer: from resume_from, else from cfg.init_checkpoint, else new.

    A new one is a collective when it trains its tokenizer: rank 0 trains and saves it while
    the others wait. A new one with a pretrained text tower takes that tower's tokenizer instead.
    """
    if resume_from is not None:
        return _from_checkpoint(cfg, resume_from, fine_tune=False)
    if cfg.init_checkpoint is not None:
        return _from_checkpoint(cfg, Path(cfg.init_checkpoint), fine_tune=True)
    preset_cfg = cfg.model_cfg()
    towers = PretrainedTowers.read(cfg, preset_cfg)
    model_cfg = towers.model_config(preset_cfg, cfg.model)
    if towers.text is not None and towers.text.tokenizer is not None:
        tokenizer = towers.text.tokenizer
    else:
        tokenizer_path = run_dir / TOKENIZER_FILE
        if info.is_main:
            tokenizer = train_tokenizer(cfg, tokenizer_captions(run), model_cfg=model_cfg)
            tokenizer.save(tokenizer_path)
        barrier(info)
        if not info.is_main:
            tokenizer = CLIPTokenizer.load(tokenizer_path)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                f"the tokenizer trained on the captions has {tokenizer.vocab_size} tokens but the model's vocab_size "
                f"is {model_cfg.vocab_size} (byte-level BPE needs at least 259); raise it, e.g. --set vocab_size=512"
            )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every rerun
    model = CLIP(model_cfg)
    towers.load_into(model)
    model.train()
    return RunModel(model, tokenizer, towers.origin(cfg))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked for, or by default on a GPU; None for plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def wrap_for_training(model: CLIP, *, info: DistInfo, device: torch.device, compile_model: bool) -> nn.Module:
    """The module the step runs: CLIP behind one forward, in DDP across ranks, optionally compiled."""
    module: nn.Module = ContrastiveModule(model)
    if info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    if compile_model:
        module = torch.compile(module)
    return module
