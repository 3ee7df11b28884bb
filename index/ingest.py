"""Decode images in worker processes and embed them in batches on the main one.

Workers read the bytes, hash them (the duplicate key), read the size and run the model's
own preprocessing (model.image.load_and_preprocess with the checkpoint's transform), so the
main process only runs the image tower: decoding stays off the critical path.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model import ClipforgeError, CLIPInference
from model.image import ImageTransform, load_and_preprocess

from .files import sha256_bytes

DEFAULT_MAX_FILE_BYTES = 100 * 1024 * 1024
_OBJECT_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")


@dataclass
class Decoded:
    """One input after decoding: pixels, or the reason it was skipped."""

    position: int  # index into the input list
    sha256: str = ""
    width: int = 0
    height: int = 0
    pixels: torch.Tensor | None = None
    error: str | None = None


@dataclass
class EmbeddedBatch:
    items: list[Decoded]  # decoded and not skipped, in the same order as vectors
    vectors: np.ndarray
    failed: list[Decoded] = field(default_factory=list)
    skipped: list[Decoded] = field(default_factory=list)  # decoded but rejected by `skip` (duplicates)


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(
        self, sources: Sequence[Path | bytes], transform: ImageTransform, *, max_pixels: int, max_bytes: int,
    ) -> None:
        self.sources = sources
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> Decoded:
        src = self.sources[i]
        out = Decoded(position=i)
        try:
            if isinstance(src, (bytes, bytearray)):
                data = bytes(src)
            else:
                size = os.stat(src).st_size
                if size > self.max_bytes:
                    raise ClipforgeError(f"file of {size:,} bytes exceeds the limit of {self.max_bytes:,}")
                with open(src, "rb") as fh:
                    data = fh.read()
            if len(data) > self.max_bytes:
                raise ClipforgeError(f"file of {len(data):,} bytes exceeds the limit of {self.max_bytes:,}")
            out.sha256 = sha256_bytes(data)
            try:
                out.width, out.height = Image.open(io.BytesIO(data)).size  # header only: the true size
            except (OSError, ValueError, SyntaxError):
                pass  # not an image: load_and_preprocess below raises with the precise reason
            out.pixels = load_and_preprocess(data, self.transform, self.max_pixels)
        except ClipforgeError as exc:
            out.error = _OBJECT_REPR.sub("data", str(exc))
        except OSError as exc:
            out.error = f"cannot read: {exc.strerror or exc}"
        except Exception as exc:  # noqa: BLE001 - a decoder bug on hostile input must not stop a 1M-image build
            out.error = f"cannot decode: {type(exc).__name__}: {exc}"
        return out


def _collate(items: list[Decoded]) -> list[Decoded]:
    return items


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def embed_sources(
    clip: CLIPInference,
    sources: Sequence[Path | bytes],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    skip: Callable[[list[Decoded]], set[int]] | None = None,
    progress: bool = False,
) -> Iterator[EmbeddedBatch]:
    """Yield embedded batches over `sources` (paths or bytes); failures come back with reasons.

    workers=None picks worker processes for large inputs and stays in-process for a handful.
    `skip` gets the decoded items of a batch and returns the positions to drop before the
    expensive forward pass (e.g. content already indexed).
    """
    if workers is None:
        workers = default_workers() if len(sources) >= 4 * batch_size else 0
    dataset = _DecodeDataset(sources, clip.transform, max_pixels=clip.max_pixels, max_bytes=max_bytes)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None, prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sources), unit="img", desc="embedding", dynamic_ncols=True)
    try:
        for items in loader:
            ok = [d for d in items if d.error is None]
            failed = [d for d in items if d.error is not None]
            drop = skip(ok) if skip is not None and ok else set()
            skipped = [d for d in ok if d.position in drop]
            keep = [d for d in ok if d.position not in drop]
            vectors = (
                clip.embed_pixels(torch.stack([d.pixels for d in keep]))
                if keep else np.zeros((0, clip.dim), np.float32)
            )
            for d in items:
                d.pixels = None  # free memory early
            if bar is not None:
                bar.update(len(items))
                bar.set_postfix(failed=len(failed), refresh=False)
            yield EmbeddedBatch(keep, vectors, failed, skipped)
    finally:
        if bar is not None:
            bar.close()
