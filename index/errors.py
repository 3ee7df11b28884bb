"""Errors of the image index. All are ClipforgeError, so the CLI prints one line and the app maps them to 4xx."""

from __future__ import annotations

from model.errors import ClipforgeError


class IndexStoreError(ClipforgeError):
    """An index directory that is missing, corrupt, locked or asked to do something it cannot."""


class IndexUnavailableError(IndexStoreError):
    """The store behind the index did not answer (a Milvus server down or too slow): the service's 503, not a 4xx."""

    unavailable = True  # the flag app/errors.py reads (the app imports index/ only when it serves one)


class IndexNotFoundError(IndexStoreError, FileNotFoundError):
    """The path holds no clipforge index."""


class IndexExistsError(IndexStoreError):
    """create() over a directory that already holds an index."""


class IndexMismatchError(IndexStoreError):
    """The index was built by another checkpoint (or with another embedding size) than the one given."""


class PathOutsideRootError(IndexStoreError, ValueError):
    """A stored or requested path that would resolve outside the index root (path traversal)."""
