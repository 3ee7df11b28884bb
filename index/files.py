"""Finding image files, naming uploads and keeping every stored path inside the index root."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np

from model.image import IMAGE_SUFFIXES

from .errors import PathOutsideRootError


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def iter_image_files(directory: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Image files under directory, recursively, sorted; hidden folders and `exclude` folders are skipped."""
    directory = Path(directory)
    excluded = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded
        )
        found.extend(here / f for f in sorted(filenames) if not f.startswith(".") and is_image_name(f))
    return found


def expand_inputs(inputs: Iterable[str | Path], exclude: Iterable[Path] = ()) -> list[Path]:
    """Files and folders as given on a command line -> image files (folders walked recursively)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        out.extend(iter_image_files(p, exclude) if p.is_dir() else [p])
    return out


def relative_to_root(path: Path, root: Path) -> str | None:
    """The POSIX path of `path` relative to `root`, or None when it lies outside (symlinks resolved)."""
    try:
        return Path(os.path.realpath(path)).relative_to(Path(os.path.realpath(root))).as_posix()
    except ValueError:
        return None


def removal_targets(targets: Iterable[int | str | Path], root: Path | None) -> tuple[set[int], list[str]]:
    """The ids, and the paths relative to the root (folders without a trailing slash), that a remove names.

    An absolute path outside the root (or any absolute path where there is no root) names nothing.
    """
    ids: set[int] = set()
    paths: list[str] = []
    for t in targets:
        if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            ids.add(int(t))
            continue
        p = Path(t)
        rel = (relative_to_root(p, root) if root is not None else None) if p.is_absolute() else p.as_posix()
        if rel:
            paths.append(rel.rstrip("/"))
    return ids, paths


def resolve_inside(root: Path, relative: str) -> Path:
    """root/relative as an absolute path, refusing anything that escapes root (.., absolute, symlinks)."""
    return resolve_all_inside(root, [relative])[0]


def resolve_all_inside(root: Path, relatives: Iterable[str]) -> list[Path]:
    """resolve_inside for many paths: the root and each folder resolved once, then one lstat a file
    (an add of 10,000 images spent seconds resolving every component of every path)."""
    real_root = os.path.realpath(root)
    inside = real_root.rstrip(os.sep) + os.sep
    folders: dict[PurePosixPath, str] = {}
    out = []
    for relative in relatives:
        rel = PurePosixPath(str(relative).replace("\\", "/"))
        if not str(relative) or rel.is_absolute() or ".." in rel.parts or "\x00" in str(relative):
            raise PathOutsideRootError(f"path {relative!r} is not a plain path inside the index root")
        folder = folders.get(rel.parent)
        if folder is None:
            folder = folders[rel.parent] = os.path.realpath(real_root / rel.parent)
        target = os.path.join(folder, rel.name)
        if os.path.islink(target):  # the file itself may be a link out of the root
            target = os.path.realpath(target)
        if target != real_root and not target.startswith(inside):
            raise PathOutsideRootError(f"path {relative!r} resolves outside the index root")
        out.append(Path(target))
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, sha256: str) -> str:
    """A collision-free, traversal-free file name for uploaded bytes: <hash prefix>-<cleaned name>."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    stem, suffix = os.path.splitext(base)
    stem = _UNSAFE.sub("_", stem).strip("._")[:80] or "image"
    suffix = suffix.lower() if suffix.lower() in IMAGE_SUFFIXES else ""
    return f"{sha256[:16]}-{stem}{suffix}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
