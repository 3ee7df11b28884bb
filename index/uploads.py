"""Files the index stores itself (uploaded bytes, files copied in with --copy): written durably before the
index refers to them, deleted together with their entry, and never left behind by a crash.

Where they live: an index made since issue 16 keeps them in INDEX/uploads (its manifest says
uploads_in_index), so a `cp -a` of the index folder is a fully independent index; an older one
reads them from ROOT/uploads until its first write copies them in (below). Their record paths are the same
"uploads/NAME" either way; `UploadsLayout` says which folder such a path is in.

Crash safety: before a file is written (or an entry's file deleted) its record path is appended
to INDEX/.uploads-pending and fsynced. After the commit the journal is settled: a path the live
generation refers to is kept, any other is unlinked with its temporary siblings. A crash between
the two leaves the journal, and the next writer, or the next open that finds the lock free,
settles it, so a file written for a commit that never happened does not stay forever. (Each entry
also names the index folder that wrote it, for whoever reads a journal by hand.)

An older index's first write copies its files into INDEX/uploads and commits uploads_in_index
before it does anything else (`copy_into_index`), so it only ever journals, writes and deletes
in its own folder. The originals under the root are left alone: a copy of that index, or another
index over the same root, may still read them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from model.fileio import fsync_path, write_atomic

from .additions import FileToAdd
from .errors import IndexStoreError
from .files import relative_to_root, resolve_inside
from .metadata import ImageRecord

PENDING = ".uploads-pending"


@dataclass(frozen=True)
class UploadsLayout:
    """Where an index's own files are: `folder` under the index directory, or (older indexes) under the root."""

    directory: Path
    root: Path
    folder: str  # the manifest's uploads name, e.g. "uploads"
    in_index: bool

    @property
    def prefix(self) -> str:
        return self.folder.rstrip("/") + "/"

    @property
    def path(self) -> Path:
        return (self.directory if self.in_index else self.root) / self.folder

    def owns(self, rel: str) -> bool:
        """Whether a record path names a file the index stored itself (or, as a folder target, all of them)."""
        return rel.startswith(self.prefix) or rel == self.prefix.rstrip("/")

    def base_of(self, rel: str) -> Path:
        """The folder a record path is relative to."""
        return self.directory if self.in_index and self.owns(rel) else self.root

    def resolve(self, rel: str) -> Path:
        return resolve_inside(self.base_of(rel), rel)

    def shadows(self, rel: str) -> bool:
        """A root file whose record path would read as one of the index's own (root outside the index folder)."""
        if not self.in_index or not self.owns(rel):
            return False
        return os.path.realpath(self.root) != os.path.realpath(self.directory)

    def removal_target(self, target: int | str | Path) -> int | str | Path | None:
        """A remove target as the snapshot reads it: an absolute path into this index's own folder becomes its
        record path, and one under ROOT/uploads that would read as such is None (no record can hold it)."""
        if not isinstance(target, (str, Path)) or not Path(target).is_absolute() or not self.in_index:
            return target
        own = relative_to_root(Path(target), self.path)
        if own is not None:
            return self.folder if own == "." else self.prefix + own
        rel = relative_to_root(Path(target), self.root)
        return None if rel is not None and self.shadows(rel) else target


def _journal(layout: UploadsLayout, rels: Sequence[str]) -> None:
    if not rels:
        return
    path = layout.directory / PENDING
    with open(path, "a", encoding="utf-8") as fh:  # "@" + the writer's folder, then its record paths
        fh.write(f"@{os.path.realpath(layout.directory)}\n" + "".join(f"{rel}\n" for rel in rels))
        fh.flush()
        os.fsync(fh.fileno())
    fsync_path(layout.directory)


def has_pending(directory: Path) -> bool:
    return (Path(directory) / PENDING).is_file()


def store_uploads(layout: UploadsLayout, items: Iterable[tuple[str, Path | bytes]]) -> None:
    """Write each (record path, content) the index does not hold yet, each journalled before it is written.

    A crash leaves the old file or the whole new one, never a torn one; the caller holds the write lock.
    """
    writes = []
    for rel, content in items:
        target = layout.resolve(rel)
        data = content if isinstance(content, (bytes, bytearray)) else Path(content).read_bytes()
        if target.is_file() and target.stat().st_size == len(data):
            continue  # the name holds the content hash: same name and size is the same file
        writes.append((rel, target, data))
    _journal(layout, [rel for rel, _, _ in writes])  # only files this call creates may be cleaned up
    for _, target, data in writes:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data)


def journal_deletions(layout: UploadsLayout, records: Iterable[ImageRecord]) -> None:
    """Journal the stored files of records about to be removed: settling deletes them once the commit is live."""
    _journal(layout, [rec.path for rec in records if layout.owns(rec.path)])


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):  # model.fileio.write_atomic's temporaries
        tmp.unlink(missing_ok=True)


def settle_pending(layout: UploadsLayout, referenced: Callable[[list[str]], Iterable[str]]) -> list[str]:
    """Unlink journalled files the live generation does not refer to, then drop the journal; returns them.

    `referenced` gives the paths among its argument that live records hold. The caller holds the write lock.
    """
    journal = layout.directory / PENDING
    try:
        lines = [line for line in journal.read_text(encoding="utf-8").splitlines() if line]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexStoreError(f"cannot read {journal}: {exc}") from exc
    rels = sorted({line for line in lines if not line.startswith("@")})
    live = set(referenced(rels))
    orphans = [rel for rel in rels if rel not in live and layout.owns(rel)]
    for rel in orphans:
        try:
            _unlink(layout.resolve(rel))
        except (OSError, IndexStoreError):
            pass  # a path that no longer resolves inside its folder is not ours to delete
    journal.unlink(missing_ok=True)
    fsync_path(layout.directory)
    return orphans


def copy_into_index(layout: UploadsLayout, rels: Iterable[str]) -> None:
    """Copy an older index's stored files from ROOT/uploads into INDEX/uploads, each whole (the originals stay).

    Run before the commit that flips uploads_in_index: a crash leaves complete copies nothing reads yet,
    which the next attempt reuses. A file already missing stays missing (its record is left as it was).
    """
    moved = replace(layout, in_index=True)
    for rel in rels:
        if not layout.owns(rel):
            continue
        try:
            source, target = layout.resolve(rel), moved.resolve(rel)
        except IndexStoreError:
            continue  # a path that no longer resolves inside its folder: left as it was
        if source == target or not source.is_file():
            continue
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, source.read_bytes())


def split_shadowed(
    layout: UploadsLayout, files: list[FileToAdd], *, copy: bool,
) -> tuple[list[FileToAdd], list[tuple[str, str]]]:
    """Root files under ROOT/uploads, whose record path would name this index's own folder: copied or refused."""
    kept: list[FileToAdd] = []
    refused: list[tuple[str, str]] = []
    for f in files:
        if f.rel is None or not layout.shadows(f.rel):
            kept.append(f)
        elif copy:
            kept.append(replace(f, rel=None))  # into the index's own uploads, under a content-derived name
        else:
            why = (f"under {layout.prefix} in the root, where older indexes kept their uploads; this index "
                   f"keeps its own in {layout.path}: move the file, or copy it in (--copy)")
            refused.append((f.name, why))
    return kept, refused
