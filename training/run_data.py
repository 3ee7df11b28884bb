"""The data a training run needs, resolved from its config: train source, val records, zero-shot set."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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

    @property
    def streamed(self) -> bool:
        return self.shards is not None


def resolve_data(cfg: TrainConfig) -> RunData:
    """Load records (or locate shards), split off validation data and load the zero-shot set."""
    from training.data import load_records, parse_data_spec, split_records
    from training.data.shards import shard_list

    spec = parse_data_spec(cfg.data)
    val: EvalSet | None = None
    if cfg.val_data:
        val_set = load_records(parse_data_spec(cfg.val_data), cfg.max_val_samples)
        val = EvalSet(val_set.records, class_names=val_set.class_names, templates=val_set.templates)
    if cfg.samples_per_epoch is not None and spec.kind != "webdataset":
        raise ConfigError("samples_per_epoch is for streamed (webdataset) data; other data sets know their length")
    if spec.kind == "webdataset":
        if cfg.max_steps is None and cfg.samples_per_epoch is None:
            raise ConfigError("streamed (webdataset) data has no known length: set samples_per_epoch or max_steps")
        if cfg.samples_per_epoch is not None and cfg.samples_per_epoch < cfg.batch_size:
            raise ConfigError(f"samples_per_epoch ({cfg.samples_per_epoch}) is below batch_size ({cfg.batch_size})")
        shard_list(spec.path)  # missing shards fail here, on every rank alike
        run = RunData(train_records=None, shards=spec.path, val=val, zeroshot=None)
    else:
        loaded = load_records(spec, cfg.max_samples)
        train_set = loaded
        if val is None and cfg.val_fraction > 0:
            train_set, val_set = split_records(loaded, cfg.val_fraction, cfg.seed)
            records = val_set.records[: cfg.max_val_samples] if cfg.max_val_samples else val_set.records
            val = EvalSet(records, class_names=val_set.class_names, templates=val_set.templates) if records else None
        if len(train_set.records) < cfg.batch_size:
            raise ConfigError(
                f"only {len(train_set.records)} training images but batch_size is {cfg.batch_size}; "
                "lower batch_size or add data"
            )
        run = RunData(train_records=train_set.records, shards=None, val=val, zeroshot=None,
                      class_names=loaded.class_names, templates=loaded.templates)
    if cfg.zeroshot_data:
        zeroshot_set = load_records(parse_data_spec(cfg.zeroshot_data))
        if not zeroshot_set.class_names or any(r.label is None for r in zeroshot_set.records):
            raise ConfigError(f"zeroshot_data {cfg.zeroshot_data} must be labelled (image folder or shapes)")
        run.zeroshot = EvalSet(zeroshot_set.records, class_names=zeroshot_set.class_names,
                               templates=zeroshot_set.templates)
        run.class_names, run.templates = zeroshot_set.class_names, zeroshot_set.templates
    elif run.class_names is None and val is not None and val.class_names:
        run.class_names, run.templates = val.class_names, val.templates
    return run


def train_transform(model_cfg: CLIPConfig, augment: bool, hflip: bool = False) -> ImageTransform:
    """The model's own preprocessing (an imported model's resize, mean and std), with augmentation if asked."""
    return ImageTransform.for_config(model_cfg, train=augment, hflip=augment and hflip)


def make_train_loader(
    run: RunData, cfg: TrainConfig, *, model_cfg: CLIPConfig, info: DistInfo, device: torch.device, epoch: int,
    start_batch: int,
) -> Iterator[dict]:
    """This rank's batches of one epoch, from batch start_batch on (steps_per_epoch says how many there are)."""
    from training.data import CaptionDataset, ShardDataset, collate

    transform = train_transform(model_cfg, cfg.train_augment, cfg.hflip)
    local_batch = cfg.batch_size // info.world_size
    common: dict[str, Any] = {
        "batch_size": local_batch, "num_workers": cfg.num_workers, "collate_fn": collate,
        "pin_memory": device.type == "cuda", "generator": torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
    }
    if run.streamed:
        stream = ShardDataset(run.shards, transform, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                              samples_per_epoch=cfg.samples_per_epoch)
        stream.set_epoch(epoch)
        loader = iter(DataLoader(stream, drop_last=True, **common))
        for _ in range(start_batch):  # a stream can only be fast-forwarded by reading it
            if next(loader, None) is None:
                break
        return loader
    dataset = CaptionDataset(run.train_records, transform, seed=cfg.seed)
    dataset.set_epoch(epoch)
    sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, info, seed=cfg.seed)
    sampler.set_epoch(epoch, start_batch)
    return iter(DataLoader(dataset, sampler=sampler, drop_last=True, **common))


def steps_per_epoch(run: RunData, cfg: TrainConfig) -> int | None:
    """Optimiser steps in one epoch (GlobalBatchSampler's batches_per_epoch for map-style data); None for a
    stream of unknown length (it ends when the shards do)."""
    if run.streamed:
        return cfg.samples_per_epoch // cfg.batch_size if cfg.samples_per_epoch else None
    return len(run.train_records) // cfg.batch_size
