"""Decoding uploaded and stored images within a memory budget.

A small upload can decode to gigabytes (82 KB of PNG holds 6000 x 6000 16-bit pixels), so
every decode is priced from the image's header first (model.image.read_header): one that
would decode to more than `max_decode_bytes` gets a 413 before anything is allocated, and
the others run only while their estimated peak fits in `decode_memory_bytes` together
(`DecodeGate`). Small images take a sliver of the budget and never wait on each other;
eight huge ones take turns instead of exhausting the container.
"""

from __future__ import annotations

import asyncio
import io
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from starlette.concurrency import run_in_threadpool

from model import CLIPInference
from model.errors import ImageError
from model.image import (
    ImageHeader,
    ImageSource,
    open_image,
    read_header,
    refuse_oversized,
)

from .errors import ApiError, image_error


class DecodeGate:
    """A first-come-first-served byte semaphore on the event loop: hold(n) waits until n more bytes fit.

    A request larger than the whole capacity is held at the capacity (it runs alone), so
    nothing waits forever; a later small request never overtakes an earlier large one.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        n = max(0, min(int(nbytes), self.capacity))
        await self._acquire(n)
        try:
            yield
        finally:
            self._release(n)

    async def _acquire(self, n: int) -> None:
        if not self._waiters and self.in_use + n <= self.capacity:
            self.in_use += n
            return
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():  # granted just as it was cancelled
                self._release(n)
            else:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._wake()  # the one behind it may fit now
            raise

    def _release(self, n: int) -> None:
        self.in_use -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            n, future = self._waiters.popleft()
            if not future.done():
                self.in_use += n
                future.set_result(None)


@dataclass(frozen=True)
class ImageDecoder:
    """The model's preprocessing of uploads and stored files, priced and gated (see the module docstring)."""

    clip: CLIPInference
    gate: DecodeGate
    max_decode_bytes: int

    def price(self, source: ImageSource, draft_size: int | None) -> ImageHeader:
        """The header's cost, or the ApiError (413 too large, 415 not an image) the decode would end in."""
        try:
            header = read_header(source, draft_size)
            refuse_oversized(header, max_pixels=self.clip.max_pixels, max_decode_bytes=self.max_decode_bytes)
        except ImageError as exc:
            raise image_error(exc) from None
        return header

    def upload_peak(self, data: bytes) -> int:
        """What decoding an upload for the index will hold at peak; the 413 of an oversized one.

        Bytes that are not a readable image cost nothing here: the index's own decode reports them.
        """
        try:
            return self.price(data, self.clip.transform.draft_size).peak_bytes
        except ApiError as err:
            if err.status == 413:
                raise
            return 0

    @asynccontextmanager
    async def holding(self, nbytes: int) -> AsyncIterator[None]:
        """Hold nbytes of the budget around work that decodes elsewhere (the index's model thread)."""
        async with self.gate.hold(nbytes):
            yield

    async def preprocess(self, data: bytes) -> torch.Tensor:
        """Uploaded bytes -> the model's (3, S, S) input, decoded off the event loop within the budget."""
        draft = self.clip.transform.draft_size
        header = self.price(data, draft)
        async with self.gate.hold(header.peak_bytes):
            try:
                return await run_in_threadpool(self._preprocess, data, draft)
            except ImageError as exc:
                raise image_error(exc) from None

    def _preprocess(self, data: bytes, draft: int | None) -> torch.Tensor:
        img = open_image(data, max_pixels=self.clip.max_pixels, draft_size=draft, max_decode_bytes=self.max_decode_bytes)
        return self.clip.transform(img)

    async def thumbnail(self, path: Path, size: int) -> bytes:
        """A JPEG of at most size x size from a stored file, decoded within the budget."""
        header = self.price(path, size)
        async with self.gate.hold(header.peak_bytes):
            try:
                return await run_in_threadpool(_thumbnail, path, size, self.clip.max_pixels, self.max_decode_bytes)
            except ImageError as exc:
                raise image_error(exc) from None


def _thumbnail(path: Path, size: int, max_pixels: int, max_decode_bytes: int) -> bytes:
    img = open_image(path, max_pixels=max_pixels, draft_size=size, max_decode_bytes=max_decode_bytes)
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()
