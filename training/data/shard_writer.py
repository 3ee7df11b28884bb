"""Write any loaded RecordSet as webdataset-style tar shards, so it can be streamed like larger data."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import DataError
from .records import Record
from .shards import SHARD_EXTENSION_OF_FORMAT


@dataclass(frozen=True)
class ShardWriteResult:
    """What write_shards produced: the brace pattern to pass to ShardDataset, and the counts."""

    pattern: str
    shards: list[Path]
    n_written: int
    n_skipped: int


def _image_payload(image: str | bytes) -> tuple[bytes, str] | None:
    try:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            ext = SHARD_EXTENSION_OF_FORMAT.get(im.format or "")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return (data, ext) if ext else None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    records: Iterable[Record], out_dir: str | Path, samples_per_shard: int = 1000, prefix: str = "shard"
) -> ShardWriteResult:
    """Pack records into out_dir/prefix-000000.tar, ... (image bytes as stored, all captions one per line in .txt).

    Records whose image is missing, unreadable or not JPEG/PNG/WebP are skipped and
    counted. Each shard is written under a temporary name and renamed when complete.
    """
    if samples_per_shard < 1:
        raise DataError("samples_per_shard must be at least 1")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    pending: list[tuple[Record, bytes, str]] = []
    written = skipped = 0

    def flush() -> None:
        final = out / f"{prefix}-{len(shards):06d}.tar"
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            with tarfile.open(tmp, "w") as tar:
                for n, (r, data, ext) in enumerate(pending, start=written - len(pending)):
                    key = f"{n:09d}"
                    _add(tar, f"{key}.{ext}", data)
                    _add(tar, f"{key}.txt", "\n".join(c.replace("\n", " ") for c in r.captions).encode("utf-8"))
                    if r.label is not None:
                        _add(tar, f"{key}.cls", str(r.label).encode())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        shards.append(final)
        pending.clear()

    for r in records:
        payload = _image_payload(r.image)
        if payload is None:
            skipped += 1
            continue
        pending.append((r, *payload))
        written += 1
        if len(pending) == samples_per_shard:
            flush()
    if pending:
        flush()
    if not shards:
        raise DataError(f"no readable images to write ({skipped} skipped)")
    last = len(shards) - 1
    pattern = str(out / f"{prefix}-{{000000..{last:06d}}}.tar") if last else str(shards[0])
    return ShardWriteResult(pattern=pattern, shards=shards, n_written=written, n_skipped=skipped)
