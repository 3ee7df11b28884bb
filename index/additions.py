"""Turning inputs into new index entries: which files may be added, de-duplication by content hash
(against the index and within one call), one record per path, and commits in chunks during long adds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .files import relative_to_root, safe_filename
from .metadata import ImageRecord, MetadataReader
from .types import AddReport, NewImage

if TYPE_CHECKING:  # annotations only; the embedding pipeline (ingest.py) is imported when first used
    from model import CLIPInference

    from .ingest import Decoded

MIN_COMMIT_EVERY = 10_000


@dataclass(frozen=True)
class PendingImage:
    """An embedded input waiting for the next commit."""

    name: str  # how the caller named the input (for reports)
    image: NewImage
    vector: np.ndarray
    upload: Path | bytes | None = None  # content to store at root/image.path before committing


class PendingImageFactory(Protocol):
    """Builds the entry for one decoded input of an add call from its embedding."""

    def __call__(self, decoded: Decoded, vector: np.ndarray) -> PendingImage: ...


@dataclass(frozen=True)
class EmbedOptions:
    batch_size: int = 64
    workers: int | None = None  # decoding processes; None picks by the input size
    progress: bool = False
    max_bytes: int | None = None  # per input; None: ingest.DEFAULT_MAX_FILE_BYTES
    commit_every: int | None = None  # None: grows with the index, at least MIN_COMMIT_EVERY


@dataclass(frozen=True)
class AddTarget:
    """What an ingest needs of the index it fills, asked afresh at each batch because commits change it."""

    ids_by_hash: Callable[[Sequence[str]], dict[str, int]]
    commit: Callable[[list[PendingImage]], AddReport]
    size: Callable[[], int]


@dataclass(frozen=True)
class FileToAdd:
    name: str  # as the caller gave it
    source: Path
    rel: str | None  # path inside the root, or None when the file is to be copied into the uploads folder
    caption: str | None


def files_to_add(
    paths: Sequence[str | Path], captions: Sequence[str | None] | None, *, root: Path, copy_outside_root: bool,
) -> tuple[list[FileToAdd], list[tuple[str, str]]]:
    """The files an add may embed, and the others with the reason each is refused."""
    accepted: list[FileToAdd] = []
    failed: list[tuple[str, str]] = []
    for i, raw in enumerate(paths):
        p = Path(raw)
        caption = captions[i] if captions is not None else None
        if not p.is_file():
            failed.append((str(raw), "no such file" if not p.exists() else "not a regular file"))
            continue
        rel = relative_to_root(p, root)
        if rel is None and not copy_outside_root:
            failed.append((str(raw), f"outside the index root {root}; move it there or copy it in (--copy)"))
            continue
        accepted.append(FileToAdd(str(raw), p, rel, caption))
    return accepted, failed


def pending_files(files: Sequence[FileToAdd], uploads: str) -> PendingImageFactory:
    """Entries for files in the root, or copied into the uploads folder under a content-derived name."""

    def pending(decoded: Decoded, vector: np.ndarray) -> PendingImage:
        f = files[decoded.position]
        if f.rel is not None:
            image = NewImage(f.rel, decoded.sha256, decoded.width, decoded.height, f.caption)
            return PendingImage(f.name, image, vector)
        rel = f"{uploads}/{safe_filename(Path(f.name).name, decoded.sha256)}"
        return PendingImage(f.name, NewImage(rel, decoded.sha256, decoded.width, decoded.height, f.caption), vector, f.source)

    return pending


def pending_uploads(items: Sequence[tuple[str, bytes, str | None]], uploads: str) -> PendingImageFactory:
    """Entries for uploaded (filename, content, caption) items, stored in the uploads folder."""

    def pending(decoded: Decoded, vector: np.ndarray) -> PendingImage:
        name, content, caption = items[decoded.position]
        rel = f"{uploads}/{safe_filename(name, decoded.sha256)}"
        return PendingImage(name, NewImage(rel, decoded.sha256, decoded.width, decoded.height, caption), vector, content)

    return pending


def ingest(
    clip: CLIPInference, sources: Sequence[Path | bytes], *, pending_for: PendingImageFactory, target: AddTarget,
    options: EmbedOptions, names: Sequence[str] | None = None,
) -> AddReport:
    """Embed `sources` and commit them in chunks; content already indexed is skipped before the forward pass."""
    from .ingest import DEFAULT_MAX_FILE_BYTES, embed_sources

    report = AddReport()
    seen: set[str] = set()  # hashes met earlier in this call
    repeats: list[tuple[str, str]] = []  # (name, hash) of inputs repeating an earlier input

    def name_of(position: int) -> str:
        return names[position] if names is not None else str(sources[position])

    def skip(items: list[Decoded]) -> set[int]:
        known = target.ids_by_hash([d.sha256 for d in items])
        drop = set()
        for d in items:
            if d.sha256 in known:
                report.duplicates.append((name_of(d.position), known[d.sha256]))
                drop.add(d.position)
            elif d.sha256 in seen:
                repeats.append((name_of(d.position), d.sha256))
                drop.add(d.position)
            else:
                seen.add(d.sha256)
        return drop

    pending: list[PendingImage] = []
    for batch in embed_sources(
        clip, sources, batch_size=options.batch_size, workers=options.workers,
        max_bytes=options.max_bytes or DEFAULT_MAX_FILE_BYTES, skip=skip, progress=options.progress,
    ):
        report.failed.extend((name_of(d.position), d.error or "failed") for d in batch.failed)
        pending.extend(pending_for(d, vec) for d, vec in zip(batch.items, batch.vectors))
        if len(pending) >= (options.commit_every or max(MIN_COMMIT_EVERY, target.size())):
            report.merge(target.commit(pending))
            pending = []
    if pending:
        report.merge(target.commit(pending))
    if repeats:  # point each repeat at the id its first copy received
        ids = target.ids_by_hash([h for _, h in repeats])
        report.duplicates.extend((name, ids.get(h, -1)) for name, h in repeats)
    return report


@dataclass
class FreshImages:
    """The part of a commit's input that is new, and what the rest turned out to be."""

    fresh: list[PendingImage]
    duplicates: list[tuple[str, int]]  # (name, id already holding the content)
    replaced: list[int]  # ids whose path gets new content


def select_fresh(pending: Sequence[PendingImage], db: MetadataReader) -> FreshImages:
    """Drop content the index (or an earlier input) already holds; a path keeps only its last new content."""
    known = db.ids_by_hash([p.image.sha256 for p in pending])
    fresh: list[PendingImage] = []
    duplicates: list[tuple[str, int]] = []
    hashes: set[str] = set()
    for p in pending:
        if p.image.sha256 in known:
            duplicates.append((p.name, known[p.image.sha256]))
        elif p.image.sha256 not in hashes:
            hashes.add(p.image.sha256)
            fresh.append(p)
    by_path: dict[str, PendingImage] = {p.image.path: p for p in fresh}
    fresh = [p for p in fresh if by_path[p.image.path] is p]
    replaced = list(db.ids_by_path(list(by_path)).values())
    return FreshImages(fresh, duplicates, replaced)


def new_records(fresh: Sequence[PendingImage], ids: np.ndarray, added: str) -> list[ImageRecord]:
    return [
        ImageRecord(int(i), p.image.path, p.image.caption, int(p.image.width), int(p.image.height), p.image.sha256, added)
        for i, p in zip(ids, fresh)
    ]
