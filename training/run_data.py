"""The data a training run needs, resolved from its config: train source, val records, zero-shot set."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from model import CLIPConfig, ImageTransform
from model.errors import ConfigError

from .config import TrainConfig
from .distributed import DistInfo, GlobalBatchSampler


@dataclass
class EvalSet:
    """Labelled or captioned records to evaluate on, with the class names and templates of labelled data."""

    records: list
    class_names: list[str] | None = None
    templates: list[str] | None = None


@dataclass
class RunData:
    train_records: list | None  # map-style data
    shards: Any | None  # webdataset spec path (streamed)
    val: EvalSet | None
    zeroshot: EvalSet | None
    class_names: list[str] | None = None
    templates: list[str] | None = None
    captions_for_tokenizer: list[str] = field(default_factory=list)

    @property
    def streamed(self) -> bool:
        return self.shards is not None


def resolve_data(cfg: TrainConfig) -> RunData:
    """Load records (or locate shards), split off validation data and load the zero-shot set."""
    from training.data import load_records, parse_data_spec, split_records

    spec = parse_data_spec(cfg.data)
    val: EvalSet | None = None
    if cfg.val_data:
        vrs = load_records(parse_data_spec(cfg.val_data), cfg.max_val_samples)
        val = EvalSet(vrs.records, vrs.class_names, vrs.templates)
    if cfg.samples_per_epoch is not None and spec.kind != "webdataset":
        raise ConfigError("samples_per_epoch is for streamed (webdataset) data; other data sets know their length")
    if spec.kind == "webdataset":
        if cfg.max_steps is None and cfg.samples_per_epoch is None:
            raise ConfigError("streamed (webdataset) data has no known length: set samples_per_epoch or max_steps")
        if cfg.samples_per_epoch is not None and cfg.samples_per_epoch < cfg.batch_size:
            raise ConfigError(f"samples_per_epoch ({cfg.samples_per_epoch}) is below batch_size ({cfg.batch_size})")
        run = RunData(None, spec.path, val, None)
        run.captions_for_tokenizer = _shard_captions(spec.path, limit=200_000)
    else:
        rs = load_records(spec, cfg.max_samples)
        train_rs = rs
        if val is None and cfg.val_fraction > 0:
            train_rs, vrs = split_records(rs, cfg.val_fraction, cfg.seed)
            records = vrs.records[: cfg.max_val_samples] if cfg.max_val_samples else vrs.records
            val = EvalSet(records, vrs.class_names, vrs.templates) if records else None
        if len(train_rs.records) < cfg.batch_size:
            raise ConfigError(
                f"only {len(train_rs.records)} training images but batch_size is {cfg.batch_size}; "
                "lower batch_size or add data"
            )
        run = RunData(train_rs.records, None, val, None, rs.class_names, rs.templates)
        run.captions_for_tokenizer = [c for r in train_rs.records for c in r.captions]
    if cfg.zeroshot_data:
        zrs = load_records(parse_data_spec(cfg.zeroshot_data))
        if not zrs.class_names or any(r.label is None for r in zrs.records):
            raise ConfigError(f"zeroshot_data {cfg.zeroshot_data} must be labelled (image folder or shapes)")
        run.zeroshot = EvalSet(zrs.records, zrs.class_names, zrs.templates)
        run.class_names, run.templates = zrs.class_names, zrs.templates
    elif run.class_names is None and val is not None and val.class_names:
        run.class_names, run.templates = val.class_names, val.templates
    return run


def _shard_captions(path: str, limit: int) -> list[str]:
    """Captions from the first shards, enough to train the tokenizer without reading every image."""
    from training.data import ShardDataset

    out: list[str] = []
    ds = ShardDataset(path, ImageTransform(8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), shuffle=False, rank=0, world_size=1)
    for s in ds.raw_samples():
        if s is not None and s.captions:
            out.extend(s.captions)
            if len(out) >= limit:
                break
    return out


def train_transform(mcfg: CLIPConfig, augment: bool, hflip: bool = False) -> ImageTransform:
    return ImageTransform(mcfg.img_size, mcfg.image_mean, mcfg.image_std, train=augment, hflip=augment and hflip)


def make_train_loader(
    run: RunData, cfg: TrainConfig, mcfg: CLIPConfig, info: DistInfo, device: torch.device, epoch: int,
    start_batch: int,
) -> tuple[Iterator[dict], int | None]:
    """The loader of one epoch, starting at batch start_batch, and the number of batches per epoch (None for a
    stream of unknown length)."""
    from training.data import CaptionDataset, ShardDataset, collate

    transform = train_transform(mcfg, cfg.train_augment, cfg.hflip)
    local = cfg.batch_size // info.world_size
    common: dict[str, Any] = dict(
        batch_size=local, num_workers=cfg.num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
    )
    if run.streamed:
        ds = ShardDataset(run.shards, transform, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                          samples_per_epoch=cfg.samples_per_epoch)
        ds.set_epoch(epoch)
        loader = iter(DataLoader(ds, drop_last=True, **common))
        for _ in range(start_batch):  # a stream can only be fast-forwarded by reading it
            if next(loader, None) is None:
                break
        return loader, steps_per_epoch(run, cfg)
    ds = CaptionDataset(run.train_records, transform, seed=cfg.seed)
    ds.set_epoch(epoch)
    sampler = GlobalBatchSampler(len(ds), cfg.batch_size, info, seed=cfg.seed)
    sampler.set_epoch(epoch, start_batch)
    return iter(DataLoader(ds, sampler=sampler, drop_last=True, **common)), sampler.batches_per_epoch


def steps_per_epoch(run: RunData, cfg: TrainConfig) -> int | None:
    """Optimiser steps in one epoch; None for a stream of unknown length (it ends when the shards do)."""
    if run.streamed:
        return cfg.samples_per_epoch // cfg.batch_size if cfg.samples_per_epoch else None
    return len(run.train_records) // cfg.batch_size
