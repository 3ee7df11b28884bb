"""SearchFilter: which images a search may return, by path prefix, caption text, time added and size.

Both stores apply it before ranking, so the k results are the best k among the matching images,
not a top k cut down afterwards: Milvus inside its engine, FAISS in index/filtered.py. Times are
ISO 8601 UTC as the index records them ("2026-12-02T07:40:31Z"); the interval is half-open:
added_after <= added < added_before.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass

from .errors import IndexStoreError

MAX_FILTER_CHARS = 1024
MAX_SIDE = 1 << 20  # no image is wider or taller; a bigger minimum is a mistake, not a filter


def parse_utc(text: str, what: str) -> int:
    """Seconds since the epoch of an ISO 8601 UTC time ("2026-12-02T07:40:31Z", or just the date)."""
    value = text.strip()
    for form in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(value, form))
        except ValueError:
            continue
    raise IndexStoreError(f"{what} {text!r} is not a UTC time like 2026-12-02T07:40:31Z or 2026-12-02")


@dataclass(frozen=True)
class SearchFilter:
    """Conditions every hit must meet; None means no condition. Matching is case-sensitive."""

    path_prefix: str | None = None  # the stored path (relative to the root) starts with this
    caption_contains: str | None = None  # the caption holds this text (images without a caption never match)
    added_after: str | None = None  # added at or after this UTC time
    added_before: str | None = None  # added before this UTC time
    min_width: int | None = None  # at least this many pixels wide
    min_height: int | None = None  # at least this many pixels tall

    def __post_init__(self) -> None:
        for name in ("path_prefix", "caption_contains"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_FILTER_CHARS):
                raise IndexStoreError(f"{name} must be 1 to {MAX_FILTER_CHARS} characters")
            if value is not None and "\x00" in value:
                raise IndexStoreError(f"{name} must not contain NUL characters")
        for name in ("min_width", "min_height"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE):
                raise IndexStoreError(f"{name} must be a whole number of pixels from 1 to {MAX_SIDE}")
        after, before = self.after_seconds, self.before_seconds
        if after is not None and before is not None and after >= before:
            raise IndexStoreError(f"added_after {self.added_after} is not before added_before {self.added_before}")

    @property
    def after_seconds(self) -> int | None:
        return None if self.added_after is None else parse_utc(self.added_after, "added_after")

    @property
    def before_seconds(self) -> int | None:
        return None if self.added_before is None else parse_utc(self.added_before, "added_before")

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.path_prefix, self.caption_contains, self.added_after, self.added_before,
                                       self.min_width, self.min_height))
