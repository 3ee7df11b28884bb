"""The on-disk layout and its one atomic switch.

    INDEX/
      CURRENT            name of the live generation, replaced atomically (write, fsync, rename)
      .lock              file lock serialising writers across processes
      gen-00000007/      one complete, immutable generation:
        index.faiss        the FAISS index (often a hard link to the previous generation's)
        delta.faiss        on a large index, the vectors added since index.faiss was written (segments.py)
        meta.sqlite        metadata
        manifest.json      checkpoint hash, dim, metric, type and params, count, times
      uploads/           files the index stores itself (add_bytes, --copy)
      .uploads-pending   journal of uploads being written or deleted (settled after each commit)

A writer builds the next generation in a hidden temporary folder, fsyncs every file,
renames it to gen-N, then replaces CURRENT (model.fileio.write_atomic). A kill before the CURRENT rename leaves the
old generation live, after it the new one; the three files always switch together.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from model.fileio import fsync_path, write_atomic

from .errors import IndexNotFoundError, IndexStoreError

CURRENT = "CURRENT"
LOCK = ".lock"
FAISS_FILE = "index.faiss"
DB_FILE = "meta.sqlite"
MANIFEST_FILE = "manifest.json"
_GEN_RE = re.compile(r"^gen-(\d{8})$")
_POINTER_TMP_RE = re.compile(rf"^\.{CURRENT}\.(?:[\d.]+\.)?tmp$")  # write_atomic's temporary CURRENT


def _is_staging_leftover(name: str) -> bool:
    """A half-written generation folder or CURRENT pointer of a writer that was killed."""
    return bool(_POINTER_TMP_RE.match(name)) or (name.startswith(".gen-") and name.endswith(".tmp"))


def gen_name(generation: int) -> str:
    return f"gen-{generation:08d}"


def is_index_dir(path: Path) -> bool:
    return (Path(path) / CURRENT).is_file()


def is_empty_or_crashed_create(directory: Path) -> bool:
    """True for an empty folder, or one holding only what a create killed before its commit leaves."""
    if is_index_dir(directory):
        return False
    for entry in Path(directory).iterdir():
        name = entry.name
        if name == LOCK or _GEN_RE.match(name) or _is_staging_leftover(name):
            continue
        return False
    return True


def read_current(directory: Path) -> int:
    """The live generation number, or IndexNotFoundError when `directory` holds no index."""
    path = Path(directory) / CURRENT
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError as exc:
        raise IndexNotFoundError(f"{directory} is not a clipforge index (no {CURRENT} file)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexStoreError(f"cannot read {path}: {exc}") from exc
    match = _GEN_RE.match(text)
    if not match:
        raise IndexStoreError(f"{path} is damaged (holds {text[:40]!r})")
    return int(match.group(1))


def generations(directory: Path) -> list[int]:
    out = []
    for entry in Path(directory).iterdir():
        match = _GEN_RE.match(entry.name)
        if match and entry.is_dir():
            out.append(int(match.group(1)))
    return sorted(out)


def staging_dir(directory: Path, generation: int) -> Path:
    """A fresh hidden folder where the next generation is written."""
    tmp = Path(directory) / f".{gen_name(generation)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(directory: Path, staging: Path, generation: int) -> Path:
    """Make a fully written staging folder the live generation (the commit point is the CURRENT rename)."""
    directory = Path(directory)
    for f in staging.iterdir():
        fsync_path(f)
    fsync_path(staging)
    final = directory / gen_name(generation)
    if final.exists():  # an orphan of a writer killed between its two renames
        shutil.rmtree(final)
    os.rename(staging, final)
    fsync_path(directory)
    write_atomic(directory / CURRENT, gen_name(generation) + "\n")
    return final


def clean_up(directory: Path, live: int) -> None:
    """Drop staging leftovers, uncommitted orphans and all but the previous generation.

    The caller holds the write lock, so no leftover belongs to a live writer. The previous one stays so a reader in another process that has just read CURRENT can
    still open it; readers in this process hold open handles, which outlive the unlink.
    """
    directory = Path(directory)
    for entry in directory.iterdir():
        name = entry.name
        if _is_staging_leftover(name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        match = _GEN_RE.match(name)
        if match and int(match.group(1)) not in (live, live - 1):
            shutil.rmtree(entry, ignore_errors=True)
