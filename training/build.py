"""Where a run's model and tokenizer come from, and the wrappers the model trains in.

A new run trains its byte-level BPE tokenizer here (`train_tokenizer`), once, on rank 0,
on the captions of its training data only (`tokenizer_captions`): every caption of every
training record, after the validation split has been taken out, so validation and
zero-shot captions never shape the vocabulary; for streamed (webdataset) shards, the
first TOKENIZER_SHARD_CAPTIONS captions in stored order. The vocabulary size and context
length are the model config's, the normalisation the config's tokenizer_* settings. It
is saved as RUN/tokenizer.json, which the other ranks load. The initial weights come from
cfg.seed alone, so they are the same on every rank and in every rerun.

A resumed run, or one given init_checkpoint, takes model and tokenizer from that
checkpoint instead and trains no tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import CLIP, CLIPTokenizer, ImageTransform, load_checkpoint
from model.errors import ConfigError

from .config import TrainConfig
from .distributed import DistInfo, barrier
from .run_data import RunData
from .step import ContrastiveModule

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


def train_tokenizer(cfg: TrainConfig, captions: Iterable[str]) -> CLIPTokenizer:
    """The tokenizer a new run trains on its captions: the model's vocab and context, the config's normalisation."""
    model_cfg = cfg.model_cfg()
    return CLIPTokenizer.train(captions, vocab_size=model_cfg.vocab_size, max_length=model_cfg.max_seq_len,
                               **cfg.tokenizer_options())


def build_model_and_tokenizer(
    cfg: TrainConfig, run: RunData, *, run_dir: Path, info: DistInfo, checkpoint: Path | None,
) -> tuple[CLIP, CLIPTokenizer]:
    """The model (in train mode, on the CPU) and its tokenizer: from `checkpoint` when given, else new.

    A new one is a collective: rank 0 trains and saves the tokenizer while the others wait.
    """
    if checkpoint is not None:
        model, tokenizer, _ = load_checkpoint(checkpoint, device="cpu")
        model.train()
        return model, tokenizer
    model_cfg = cfg.model_cfg()
    tokenizer_path = run_dir / TOKENIZER_FILE
    if info.is_main:
        tokenizer = train_tokenizer(cfg, tokenizer_captions(run))
        tokenizer.save(tokenizer_path)
    barrier(info)
    if not info.is_main:
        tokenizer = CLIPTokenizer.load(tokenizer_path)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer trained on the captions has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size} (byte-level BPE needs at least 259); raise it, e.g. --set vocab_size=512"
        )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every rerun
    model = CLIP(model_cfg)
    model.train()
    return model, tokenizer


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
