"""Map-style dataset over Records, and the collate function shared with the shard stream."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from model.errors import ImageError
from model.image import DEFAULT_MAX_PIXELS, ImageTransform, open_image

from .records import Record

log = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, index: int | str) -> random.Random:
    """The RNG for one sample in one epoch: same caption and crop in any worker, after any resume."""
    return random.Random(f"{seed}:{epoch}:{index}")


def decode_sample(
    image: str | bytes, captions: Sequence[str], label: int | None, *, index: int, key: str,
    transform: ImageTransform, rng: random.Random, max_pixels: int,
) -> dict[str, Any] | None:
    """Decode and transform one image and pick one caption; None when the image cannot be used."""
    caption = captions[rng.randrange(len(captions))] if len(captions) > 1 else captions[0]
    try:
        img = open_image(image, max_pixels=max_pixels, draft_size=transform.draft_size)
        pixels = transform(img, rng)
    except (ImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        # ImageTooLargeError is an ImageError; FileNotFoundError is an OSError.
        log.debug("skipping image %s: %s", key, exc)
        return None
    return {"pixels": pixels, "caption": caption, "label": -1 if label is None else int(label), "index": index, "key": key}


class CaptionDataset(Dataset):
    """Records -> {"pixels", "caption", "label", "index", "key"} dicts, or None for unreadable images.

    With several captions per image one is drawn per epoch from (seed, epoch, index), and
    the same RNG drives the training crop, so a resumed run sees exactly the same samples.
    """

    def __init__(
        self, records: list[Record], transform: ImageTransform, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.records = records
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose captions and crops __getitem__ returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        record = self.records[i]
        image = record.image if isinstance(record.image, bytes) else Path(record.image)
        return decode_sample(
            image, record.captions, record.label, index=int(i), key=record.key, transform=self.transform,
            rng=sample_rng(self.seed, self.epoch, i), max_pixels=self.max_pixels,
        )


def collate(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack the good samples of a batch and count the bad ones (None) so the run can report them."""
    good = [b for b in batch if b is not None]
    n_bad = len(batch) - len(good)
    if good:
        pixels = torch.stack([b["pixels"] for b in good])
    else:
        pixels = torch.empty((0, 3, 0, 0), dtype=torch.float32)
    return {
        "pixels": pixels,
        "captions": [b["caption"] for b in good],
        "labels": torch.tensor([b["label"] for b in good], dtype=torch.long),
        "indices": torch.tensor([b["index"] for b in good], dtype=torch.long),
        "keys": [b["key"] for b in good],
        "n_bad": n_bad,
    }
