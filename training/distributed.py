"""torchrun integration: process-group setup, device choice, and the rank's share of each batch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from model.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (a no-op for one process).

    `auto` reads as everywhere else (model.device.resolve_device). NCCL on GPUs, gloo on CPU;
    each rank uses cuda:LOCAL_RANK when GPUs are present.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref)
    use_cuda = device.type == "cuda"
    if use_cuda:
        # Under torchrun each rank takes its own GPU, whatever index --device names (cuda:0 on
        # every rank would put all of them on one GPU, which NCCL refuses).
        explicit = device.index is not None and world == 1
        index = device.index if explicit else local % max(1, torch.cuda.device_count())
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # Rank 0 alone evaluates, trains the tokenizer and saves checkpoints while the others
        # wait in a collective: a long evaluation must not trip the default 10-minute timeout.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(hours=2))
    return DistInfo(rank, world, local), device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo":
            # Every rank arrives before gloo is torn down: a rank that leaves first makes the
            # others' gloo threads abort ("terminate called without an active exception").
            # Bounded, so a rank that died cannot hang the rest.
            try:
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            except Exception:  # noqa: BLE001, S110 - a dead peer; tear down anyway
                pass
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _all_reduce(values: list[float], op: dist.ReduceOp, info: DistInfo, device: torch.device) -> list[float]:
    """One collective over a few scalars (float64 holds the int counts exactly)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_min(value: int, info: DistInfo, device: torch.device) -> int:
    return int(_all_reduce([float(value)], dist.ReduceOp.MIN, info, device)[0])


def all_reduce_max(value: float, info: DistInfo, device: torch.device) -> float:
    return _all_reduce([value], dist.ReduceOp.MAX, info, device)[0]


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    return _all_reduce(values, dist.ReduceOp.SUM, info, device)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's obj, in rank order (a collective; [obj] alone when not distributed)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class GlobalBatchSampler(Sampler[int]):
    """Shuffled indices for this rank, arranged so rank order reassembles the global batch.

    Each epoch draws one permutation from (seed, epoch); global batch b is
    perm[b*G:(b+1)*G] and rank r reads its contiguous slice, so a DDP run sees exactly the
    global batches of a single-process run. `start_batch` skips already-trained batches
    on resume without loading them. Incomplete final batches are dropped.
    """

    def __init__(self, n: int, global_batch: int, info: DistInfo, seed: int = 0, shuffle: bool = True) -> None:
        if global_batch % info.world_size:
            raise ValueError(f"batch_size {global_batch} must be divisible by the world size {info.world_size}")
        self.n = n
        self.global_batch = global_batch
        self.local_batch = global_batch // info.world_size
        self.info = info
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        for batch in range(self.start_batch, self.batches_per_epoch):
            start = batch * self.global_batch + self.info.rank * self.local_batch
            yield from perm[start : start + self.local_batch]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch
