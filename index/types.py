"""The values ImageIndex takes and hands back: a new image's metadata, a search hit, an add's report."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SearchResult:
    id: int
    score: float
    path: str  # relative to the index root
    caption: str | None
    width: int
    height: int


@dataclass
class AddReport:
    """What an add did: new ids, inputs already indexed (with the id holding them), failures with reasons."""

    added: list[int] = field(default_factory=list)
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)  # ids dropped because their file's content changed

    def merge(self, other: AddReport) -> None:
        self.added += other.added
        self.duplicates += other.duplicates
        self.failed += other.failed
        self.replaced += other.replaced


@dataclass(frozen=True)
class NewImage:
    """Metadata of an image to add with a precomputed embedding (path relative to the root)."""

    path: str
    sha256: str
    width: int
    height: int
    caption: str | None = None
