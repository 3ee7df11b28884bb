"""The in-memory form every map-style data source is loaded into."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """One image and all of its captions.

    key is the image's stable identity (path relative to the data set root, or a content
    id): the train/val split and de-duplication use it, so it must not depend on load order.
    """

    key: str
    image: str | bytes
    captions: tuple[str, ...]
    label: int | None = None


@dataclass
class RecordSet:
    """A loaded data source; labelled sources also carry class names and caption templates."""

    name: str
    records: list[Record]
    class_names: list[str] | None = None
    templates: list[str] | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_captions(self) -> int:
        """Total number of captions (Flickr-style sets have several per image)."""
        return sum(len(r.captions) for r in self.records)


def tidy_caption(text: str) -> str:
    """Collapse runs of whitespace and trim, so equal captions compare equal."""
    return " ".join(str(text).split())


class RecordBuilder:
    """Collects (key, image, caption) rows into one Record per image, in first-seen order.

    Captions of repeated keys are merged (duplicates dropped), which is how Flickr and COCO
    files with one row per caption become one record per image.
    """

    def __init__(self, max_samples: int | None = None) -> None:
        self.max_samples = max_samples
        self._images: dict[str, str | bytes] = {}
        self._captions: dict[str, list[str]] = {}
        self._labels: dict[str, int | None] = {}

    @property
    def full(self) -> bool:
        """True once max_samples distinct images are held (later rows of known images still count)."""
        return self.max_samples is not None and len(self._images) >= self.max_samples

    def add(self, key: str, image: str | bytes, captions: str | Iterable[str], label: int | None = None) -> bool:
        """Add captions for an image; returns False when the image is new but the set is full."""
        if key not in self._images:
            if self.full:
                return False
            self._images[key] = image
            self._captions[key] = []
            self._labels[key] = label
        caps = [captions] if isinstance(captions, str) else list(captions)
        held = self._captions[key]
        for cap in caps:
            cap = tidy_caption(cap)
            if cap and cap not in held:
                held.append(cap)
        return True

    def build(self) -> list[Record]:
        """Records of all images that ended up with at least one non-empty caption."""
        return [
            Record(key=k, image=self._images[k], captions=tuple(c), label=self._labels[k])
            for k, c in self._captions.items()
            if c
        ]
