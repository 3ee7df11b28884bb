"""Webdataset-style tar shards (key.jpg + key.txt [+ key.cls]) streamed without loading them whole.

Shards are assigned to (rank, DataLoader worker) pairs so that each sample is read by
exactly one of them per epoch: whole shards when there are at least as many shards as
readers, otherwise every reader walks all shards and keeps every n-th sample.
"""

from __future__ import annotations

import logging
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from model.image import DEFAULT_MAX_PIXELS, ImageTransform

from .dataset import decode_sample, sample_rng
from .errors import DataError
from .records import tidy_caption

log = logging.getLogger(__name__)
# The image formats a shard may hold, narrower on purpose than model.image.IMAGE_SUFFIXES (the files an
# image folder may hold): the webdataset convention. A sample's image is its member with the first of
# these extensions; write_shards stores each image's bytes as they are, under its format's extension.
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_EXTENSION_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL's format name -> extension
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """"s-{000..002}.tar" -> s-000.tar, s-001.tar, s-002.tar; "{a,b}" lists too; several braces multiply."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()):
            raise DataError(f"bad range {{{body}}} in {pattern!r}: expected {{000..009}}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        a, b = int(lo), int(hi)
        step = 1 if b >= a else -1
        choices = [str(i).zfill(width) for i in range(a, b + step, step)]
    else:
        choices = body.split(",")
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def shard_list(shards: str | Sequence[str]) -> list[str]:
    """Brace-expanded shard paths ("::" separates several patterns; a folder means all its .tar files)."""
    patterns = [s for part in ([shards] if isinstance(shards, str) else shards) for s in str(part).split("::") if s]
    out: list[str] = []
    for pat in patterns:
        p = Path(pat).expanduser()
        if p.is_dir():
            out += sorted(str(f) for f in p.glob("*.tar"))
        else:
            out += [str(Path(s).expanduser()) for s in expand_braces(pat)]
    if not out:
        raise DataError(f"no shards in {shards!r}")
    missing = [s for s in out if not Path(s).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} of {len(out)} shards are missing: {', '.join(missing[:3])}{more}")
    return out


@dataclass
class RawSample:
    """One sample as stored in a shard, before decoding."""

    key: str
    index: int
    image: bytes | None
    captions: tuple[str, ...]
    label: int | None


def _split_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _finish(key: str, parts: dict[str, bytes], index: int) -> RawSample:
    image = next((parts[ext] for ext in SHARD_IMAGE_EXTENSIONS if ext in parts), None)
    captions: tuple[str, ...] = ()
    if "txt" in parts:
        text = parts["txt"].decode("utf-8", "replace")
        captions = tuple(c for c in (tidy_caption(line) for line in text.splitlines()) if c)
    label = None
    if "cls" in parts:
        try:
            label = int(parts["cls"].decode("utf-8", "replace").strip())
        except ValueError:
            label = None
    return RawSample(key=key, index=index, image=image, captions=captions, label=label)


def iter_shard(path: str, shard_id: int, limit: int | None = None) -> Iterator[RawSample | None]:
    """Samples of one shard in stored order (the first `limit` of them when given).

    A broken shard logs a warning and yields one None, so it is counted as bad, not fatal.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    position = 0
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k != key and key is not None:
                    yield _finish(key, parts, (shard_id << 32) | position)
                    position += 1
                    parts = {}
                    if limit is not None and position >= limit:
                        return
                key = k
                f = tar.extractfile(member)
                if f is not None and ext:
                    parts[ext] = f.read()
        if key is not None:
            yield _finish(key, parts, (shard_id << 32) | position)
    except (tarfile.TarError, OSError, EOFError) as exc:
        log.warning("shard %s is unreadable after %d samples (%s); skipping the rest of it", path, position, exc)
        yield None


def count_shard_samples(path: str) -> int:
    """Number of samples (distinct keys) in one shard, from its member headers only.

    Uncompressed tars are indexed by seeking past the data, so this is quick even for
    large shards; a trainer uses it to size its learning-rate schedule.
    """
    try:
        with tarfile.open(path, mode="r:*") as tar:
            return len({_split_name(m.name)[0] for m in tar.getmembers() if m.isfile()})
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read shard {path}: {exc}") from exc


def _current_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(IterableDataset):
    """Streams tar shards as the same dicts CaptionDataset returns (None for unreadable samples).

    Each (rank, worker) reads its own part of the shards in an order shuffled by
    (seed, epoch), and shuffles samples through a buffer seeded by (seed, epoch, reader).
    Call set_epoch before creating each epoch's iterator (persistent workers would keep the
    old epoch). Under DDP pass samples_per_epoch (e.g. num_samples()) so every rank yields
    the same number of samples.
    """

    def __init__(
        self, shards: str | Sequence[str], transform: ImageTransform, seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS, shuffle_buffer: int = 1000, shuffle: bool = True,
        rank: int | None = None, world_size: int | None = None, samples_per_epoch: int | None = None,
        max_samples: int | None = None,
    ) -> None:
        self.shards = shard_list(shards)
        # max_samples keeps the first N samples in stored order (a slice for quick runs):
        # whole shards while they fit, then the head of the next one.
        self.limits: list[int | None] = [None] * len(self.shards)
        if max_samples is not None:
            if max_samples < 1:
                raise DataError("max_samples must be positive")
            kept, left = [], max_samples
            for path in self.shards:
                if left <= 0:
                    break
                n = count_shard_samples(path)
                kept.append((path, None if n <= left else left))
                left -= n
            self.shards = [p for p, _ in kept]
            self.limits = [lim for _, lim in kept]
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.shuffle = shuffle
        if (rank is None) != (world_size is None):
            raise DataError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise DataError(f"rank {rank} out of range for world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise DataError("samples_per_epoch must be positive")
        self.samples_per_epoch = samples_per_epoch
        self.epoch = 0

    def num_samples(self) -> int:
        """Total samples in all shards (every rank and worker together), counted from the tar headers."""
        return sum(
            count_shard_samples(s) if lim is None else lim for s, lim in zip(self.shards, self.limits, strict=True)
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds shard order, the shuffle buffer, captions and crops."""
        self.epoch = int(epoch)

    def _reader(self) -> tuple[int, int]:
        """(this reader's number, the number of readers): every DataLoader worker of every rank reads."""
        rank, world = _current_rank(self.rank, self.world_size)
        worker = get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        return rank * n_workers + worker_id, world * n_workers

    def raw_samples(self, pass_id: str = "") -> Iterator[RawSample | None]:
        """This reader's undecoded samples for the current epoch, before the shuffle buffer."""
        reader, readers = self._reader()
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}{pass_id}:shards").shuffle(order)
        if len(order) >= readers:
            for shard_id in order[reader::readers]:
                yield from iter_shard(self.shards[shard_id], shard_id, self.limits[shard_id])
            return
        n = 0
        for shard_id in order:
            for s in iter_shard(self.shards[shard_id], shard_id, self.limits[shard_id]):
                if n % readers == reader:
                    yield s
                n += 1

    def _shuffled(self, pass_id: str = "") -> Iterator[RawSample | None]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from self.raw_samples(pass_id)
            return
        reader, readers = self._reader()
        rng = random.Random(f"{self.seed}:{self.epoch}{pass_id}:buffer:{reader}:{readers}")
        buf: list[RawSample | None] = []
        for s in self.raw_samples(pass_id):
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _epoch_stream(self) -> Iterator[RawSample | None]:
        """One pass over this reader's part, or exactly samples_per_epoch / readers samples when set.

        The fixed count gives every rank the same number of batches, which DDP needs (a rank
        that runs out first would leave the others waiting forever); a reader whose part is
        short continues into a fresh shuffle of it, one whose part is long stops early.
        """
        if self.samples_per_epoch is None:
            yield from self._shuffled()
            return
        quota = self.samples_per_epoch // self._reader()[1]
        n, passes = 0, 0
        while n < quota:
            got = 0
            for s in self._shuffled(f".{passes}" if passes else ""):
                yield s
                got += 1
                n += 1
                if n >= quota:
                    return
            if got == 0:
                raise DataError(f"no samples for this reader in {len(self.shards)} shards")
            passes += 1

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        for s in self._epoch_stream():
            if s is None or s.image is None or not s.captions:
                yield None
                continue
            yield decode_sample(
                s.image, s.captions, s.label, index=s.index, key=s.key, transform=self.transform,
                rng=sample_rng(self.seed, self.epoch, s.key), max_pixels=self.max_pixels,
            )
