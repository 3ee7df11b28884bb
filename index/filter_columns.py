"""The metadata a SearchFilter reads, held column-wise in numpy, so finding who passes takes milliseconds at 1M.

SQLite answers a scan of every row in hundreds of milliseconds at a million images (it reads whole
rows, and each passing id costs a Python object; docs/benchmarks.md, Filtered search). A generation's
metadata never changes, so it is read once, on the first filtered search, into arrays: sizes and
times compared whole, and paths and captions as one byte string each (UTF-8, rows separated by
NUL): a prefix found by binary search over the rows' sorted first 8 bytes, a substring matched a
needle byte at a time over the positions of its rarest byte. Byte matching is character
matching in UTF-8, and a needle holds no NUL, so a match never spans two rows.
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Sequence
from itertools import pairwise

import numpy as np

from .metadata import ImageRecord, MetadataReader
from .search_filter import SearchFilter

_FETCH = 50_000  # rows per fetch while loading


def _seconds(stamp: str, cache: dict[str, int]) -> int:
    """Seconds of the index's own "2026-12-02T07:40:31Z" form (rows added together share one stamp)."""
    found = cache.get(stamp)
    if found is None:
        found = cache[stamp] = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    return found


class _Text:
    """Variable-length strings of every row in one NUL-separated byte array (no string objects kept)."""

    def __init__(self, data: np.ndarray, lengths: np.ndarray, present: np.ndarray) -> None:
        """data: each row's bytes followed by a NUL, row after row."""
        self.starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
        self.lengths = lengths
        self.present = present
        self.data = data
        self.byte_counts = np.bincount(self.data, minlength=256)  # the rarest byte of a needle anchors its search
        self._sorted_heads: tuple[np.ndarray, np.ndarray] | None = None  # built on the first prefix search

    @staticmethod
    def _parts(values: list[bytes | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        present = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        pieces = [v or b"" for v in values]
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        return np.frombuffer(b"".join(p + b"\x00" for p in pieces), dtype=np.uint8), lengths, present

    @classmethod
    def of(cls, values: list[bytes | None]) -> _Text:
        return cls(*cls._parts(values))

    def kept_and_appended(self, keep: np.ndarray, values: list[bytes | None]) -> _Text:
        """These rows where `keep`, then `values`: the next generation's text without re-reading the rest."""
        data, lengths, present = self._parts(values)
        return _Text(
            np.concatenate([self.data[np.repeat(keep, self.lengths + 1)], data]),
            np.concatenate([self.lengths[keep], lengths]), np.concatenate([self.present[keep], present]),
        )

    def _heads(self) -> tuple[np.ndarray, np.ndarray]:
        """Each row's first 8 bytes as one big-endian number (NUL-padded), sorted, and the rows in that order."""
        if self._sorted_heads is None:
            heads = np.zeros(len(self.starts), dtype=np.uint64)
            for offset in range(8):
                byte = np.where(self.lengths > offset, self.data[np.minimum(self.starts + offset, len(self.data) - 1)], 0)
                heads = (heads << np.uint64(8)) | byte.astype(np.uint64)
            order = np.argsort(heads, kind="stable")
            self._sorted_heads = (heads[order], order)
        return self._sorted_heads

    def starting_with(self, prefix: bytes) -> np.ndarray:
        """Mask of rows whose text starts with `prefix`: a range of the sorted heads, then the bytes past 8."""
        heads, order = self._heads()
        low = int.from_bytes(prefix[:8].ljust(8, b"\x00"), "big")
        high = int.from_bytes(prefix[:8].ljust(8, b"\xff"), "big")
        rows = order[np.searchsorted(heads, np.uint64(low), "left") : np.searchsorted(heads, np.uint64(high), "right")]
        rows = rows[self.present[rows] & (self.lengths[rows] >= len(prefix))]
        for offset in range(8, len(prefix)):
            rows = rows[self.data[self.starts[rows] + offset] == prefix[offset]]
        mask = np.zeros(len(self.starts), dtype=bool)
        mask[rows] = True
        return mask

    def containing(self, needle: bytes) -> np.ndarray:
        """Mask of rows whose text holds `needle` somewhere."""
        end = len(self.data) - len(needle) + 1
        anchor = int(np.argmin(self.byte_counts[np.frombuffer(needle, dtype=np.uint8)]))
        at = np.flatnonzero(self.data == needle[anchor]) - anchor
        at = at[(at >= 0) & (at < end)]
        for offset in range(len(needle)):
            if offset != anchor:
                at = at[self.data[at + offset] == needle[offset]]
        mask = np.zeros(len(self.starts), dtype=bool)
        mask[np.searchsorted(self.starts, at, side="right") - 1] = True
        return mask & self.present


class FilterColumns:
    """One generation's filterable metadata; loaded on first use, shared by every search of that generation."""

    def __init__(self, db: MetadataReader) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._loaded = False

    @classmethod
    def following(
        cls, previous: FilterColumns | None, db: MetadataReader, *, removed: np.ndarray, added: Sequence[ImageRecord],
    ) -> FilterColumns:
        """The next generation's columns: derived from the previous generation's when those are loaded, so a
        small write costs milliseconds rather than a reload of every row on the next filtered search."""
        columns = cls(db)
        ascending = all(a.id < b.id for a, b in pairwise(added))  # new ids come from next_id, in order
        if previous is not None and previous._loaded and ascending and (
                not len(added) or not len(previous.ids) or added[0].id > previous.ids[-1]):
            with previous._lock:
                columns._derive(previous, removed, added)
        return columns

    def _derive(self, previous: FilterColumns, removed: np.ndarray, added: Sequence[ImageRecord]) -> None:
        keep = ~np.isin(previous.ids, removed)
        stamps: dict[str, int] = {}
        self.ids = np.concatenate([previous.ids[keep], np.array([r.id for r in added], dtype=np.int64)])
        self.widths = np.concatenate([previous.widths[keep], np.array([r.width for r in added], dtype=np.int64)])
        self.heights = np.concatenate([previous.heights[keep], np.array([r.height for r in added], dtype=np.int64)])
        self.added = np.concatenate([previous.added[keep],
                                     np.array([_seconds(r.added, stamps) for r in added], dtype=np.int64)])
        self.paths = previous.paths.kept_and_appended(keep, [r.path.encode("utf-8", "surrogatepass") for r in added])
        self.captions = previous.captions.kept_and_appended(
            keep, [None if r.caption is None else r.caption.encode("utf-8", "surrogatepass") for r in added])
        self._loaded = True

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            ids, widths, heights, added, paths, captions = [], [], [], [], [], []
            stamps: dict[str, int] = {}
            for rows in self._db.filter_rows(_FETCH):
                for image_id, path, caption, width, height, stamp in rows:
                    ids.append(image_id)
                    paths.append(path.encode("utf-8", "surrogatepass"))
                    captions.append(None if caption is None else caption.encode("utf-8", "surrogatepass"))
                    widths.append(width)
                    heights.append(height)
                    added.append(_seconds(stamp, stamps))
            self.ids = np.array(ids, dtype=np.int64)
            self.widths = np.array(widths, dtype=np.int64)
            self.heights = np.array(heights, dtype=np.int64)
            self.added = np.array(added, dtype=np.int64)
            self.paths = _Text.of(paths)
            self.captions = _Text.of(captions)
            self._loaded = True

    def matching(self, conditions: SearchFilter) -> np.ndarray:
        """Sorted ids of the images that pass every condition."""
        self._load()
        mask = np.ones(len(self.ids), dtype=bool)
        if conditions.min_width is not None:
            mask &= self.widths >= conditions.min_width
        if conditions.min_height is not None:
            mask &= self.heights >= conditions.min_height
        if conditions.after_seconds is not None:
            mask &= self.added >= conditions.after_seconds
        if conditions.before_seconds is not None:
            mask &= self.added < conditions.before_seconds
        if conditions.path_prefix is not None:
            mask &= self.paths.starting_with(conditions.path_prefix.encode("utf-8", "surrogatepass"))
        if conditions.caption_contains is not None:
            mask &= self.captions.containing(conditions.caption_contains.encode("utf-8", "surrogatepass"))
        return self.ids[mask]
