"""Durable file writes and the one timestamp format: every file that must survive a kill -9 goes through here."""

from __future__ import annotations

import os
import time
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with `data` so that a kill at any moment leaves the old or the new content.

    A private temporary sibling is written and fsynced, renamed over the target, and the
    folder fsynced so the rename itself survives a power cut.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def publish_directory(staged: Path, directory: Path) -> None:
    """Make a complete staged directory visible as `directory`, replacing any old one.

    Every file in `staged` is fsynced first; then two renames, the old copy deleted only
    afterwards, so a kill at any moment leaves the old or the new directory (a kill between
    the renames leaves the old one as `.NAME.old-*`). A mkdtemp folder is private: it gets
    the mode of an ordinary folder first.
    """
    import shutil

    staged, directory = Path(staged), Path(directory)
    for entry in staged.iterdir():
        if entry.is_file():
            fsync_path(entry)
    fsync_path(staged)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o777 & ~umask)
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(directory, old)
        os.rename(staged, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, directory)
    fsync_path(directory.parent)


def utc_timestamp(seconds: float | None = None) -> str:
    """ISO 8601 UTC to the second ("2026-12-02T07:40:31Z"), the form every JSON file of ours records."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
