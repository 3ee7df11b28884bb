"""Finding the folder a caption file's relative image paths are relative to."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import DataError


def resolve_images_root(
    anchor: Path, images_root: str | None, sample_names: Sequence[str], *, extra_candidates: Sequence[Path] = ()
) -> Path:
    """The given images_root, or the first usual folder beside the caption file that holds the images.

    Tries "images", "Images", any extra candidates, and the caption file's own folder; the
    one holding most of the first few listed images wins. Fails clearly when none does.
    """
    if images_root is not None:
        root = Path(images_root).expanduser()
        if not root.is_dir():
            raise DataError(f"images_root {root} is not a folder")
        return root.resolve()
    base = anchor.parent
    candidates = [base / "images", base / "Images", *extra_candidates, base]
    seen: list[Path] = []
    for c in candidates:
        if c.is_dir() and c.resolve() not in seen:
            seen.append(c.resolve())
    probe = [n for n in sample_names[:8] if n]
    if not probe:
        return base.resolve()
    hits = [(sum((c / n).is_file() for n in probe), c) for c in seen]
    best = max(hits, key=lambda h: h[0], default=(0, base))
    if best[0] == 0:
        tried = ", ".join(str(c) for c in seen) or str(base)
        raise DataError(
            f"cannot find the images listed in {anchor.name} (e.g. {probe[0]!r}); looked in {tried}; "
            "set images_root to the folder that holds them"
        )
    return best[1]


def image_path(root: Path, name: str) -> str:
    """Absolute path of a listed image (absolute names are kept as they are)."""
    p = Path(name).expanduser()
    return str(p if p.is_absolute() else root / p)
