"""Files the index stores itself (uploaded bytes, files copied in with --copy): written durably before the
index refers to them, deleted together with their entry."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from model.fileio import write_atomic

from .errors import IndexStoreError
from .files import resolve_inside
from .metadata import ImageRecord


def store_upload(root: Path, rel: str, content: Path | bytes) -> None:
    """Write root/rel so that a crash leaves the old file or the whole new one, never a torn one."""
    target = resolve_inside(root, rel)
    data = content if isinstance(content, (bytes, bytearray)) else Path(content).read_bytes()
    if target.is_file() and target.stat().st_size == len(data):
        return  # the name holds the content hash: same name and size is the same file
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data)


def delete_uploads(root: Path, uploads: str, records: Iterable[ImageRecord]) -> None:
    """Unlink the stored files of removed records; files the user keeps elsewhere in the root are left alone."""
    prefix = uploads.rstrip("/") + "/"
    for rec in records:
        if rec.path.startswith(prefix):
            try:
                resolve_inside(root, rec.path).unlink(missing_ok=True)
            except (OSError, IndexStoreError):
                pass
