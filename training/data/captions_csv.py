"""Caption tables: image,caption CSV (Flickr8k Kaggle captions.txt) and Flickr30k results.csv."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from .errors import DataError
from .locate import image_path, resolve_images_root
from .records import RecordBuilder, RecordSet

IMAGE_COLUMNS = ("image", "image_name", "image_path", "filename", "file_name", "file", "path", "img", "filepath")
CAPTION_COLUMNS = ("caption", "comment", "text", "sentence", "description", "title", "captions")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _open_text(path: Path):
    return path.open("r", encoding="utf-8-sig", errors="replace", newline="")


def detect_separator(header: str) -> str:
    """The most frequent of tab, '|', ';' and ',' in the header line (',' when none occurs)."""
    counts = {sep: header.count(sep) for sep in ("\t", "|", ";", ",")}
    best = max(counts, key=lambda s: counts[s])
    return best if counts[best] > 0 else ","


def _pick_column(header: list[str], wanted: str | None, *, known: tuple[str, ...], what: str, path: Path) -> int:
    normal = [h.strip().lower() for h in header]
    if wanted is not None:
        if wanted.strip().lower() in normal:
            return normal.index(wanted.strip().lower())
        raise DataError(f"{path.name} has no column {wanted!r}; its columns are {header}")
    for name in known:
        if name in normal:
            return normal.index(name)
    raise DataError(
        f"cannot tell which column of {path.name} holds the {what} (columns: {header}); "
        f"set {what}_column"
    )


def load_csv(
    path: Path, *, images_root: str | None = None, image_column: str | None = None, caption_column: str | None = None,
    separator: str | None = None, max_samples: int | None = None,
) -> RecordSet:
    """A table with a header naming an image column and a caption column, one row per caption.

    Quoted fields (captions with commas) follow the CSV rules; rows of the same image become
    one record with several captions. Rows too short to hold both columns are skipped.
    """
    if not path.is_file():
        raise DataError(f"caption file {path} does not exist")
    with _open_text(path) as f:
        first = f.readline()
        if not first.strip():
            raise DataError(f"{path} is empty")
        sep = separator or detect_separator(first)
        f.seek(0)
        reader = csv.reader(f, delimiter=sep, skipinitialspace=True)
        header = next(reader)
        image_col = _pick_column(header, image_column, known=IMAGE_COLUMNS, what="image", path=path)
        caption_col = _pick_column(header, caption_column, known=CAPTION_COLUMNS, what="caption", path=path)
        if image_col == caption_col:
            raise DataError(f"image and caption columns of {path.name} are the same column {header[image_col]!r}")
        rows: list[tuple[str, str]] = []
        try:
            for row in reader:
                if len(row) > max(image_col, caption_col) and row[image_col].strip():
                    rows.append((row[image_col].strip(), row[caption_col]))
        except csv.Error as exc:
            raise DataError(f"{path.name} line {reader.line_num}: {exc}") from exc
    return _records_from_rows(path, rows, images_root=images_root, max_samples=max_samples)


def _records_from_rows(
    path: Path, rows: list[tuple[str, str]], *, images_root: str | None, max_samples: int | None,
    extra_candidates: tuple[Path, ...] = (),
) -> RecordSet:
    if not rows:
        raise DataError(f"{path} has no image,caption rows")
    names = list(dict.fromkeys(name for name, _ in rows[:200]))
    root = resolve_images_root(path, images_root, names, extra_candidates=extra_candidates)
    builder = RecordBuilder(max_samples)
    for name, caption in rows:
        builder.add(name, image_path(root, name), caption)
    records = builder.build()
    if not records:
        raise DataError(f"{path} has no non-empty captions")
    return RecordSet(path.stem, records)


_FLICKR30K_FUSED = re.compile(r"^\s*(\d+)\s+(.*)$")


def load_flickr30k(path: Path, images_root: str | None = None, max_samples: int | None = None) -> RecordSet:
    """Flickr30k's results.csv: `image_name| comment_number| comment`, one row per caption.

    The file is not real CSV (captions hold unbalanced quotes), so it is split on '|' by
    hand. Its known malformed row lost the separator after the comment number
    (`2199200615.jpg| 4   A dog ...`): the number and caption are split apart again.
    """
    if not path.is_file():
        raise DataError(f"caption file {path} does not exist")
    rows: list[tuple[str, str]] = []
    with _open_text(path) as f:
        header = f.readline()
        if "|" not in header:
            raise DataError(f"{path.name} is not a Flickr30k results file (no '|' in its header {header.strip()!r})")
        for line in f:
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("|", 2)
            name = parts[0].strip()
            if len(parts) == 3:
                caption = parts[2]
            elif len(parts) == 2 and (m := _FLICKR30K_FUSED.match(parts[1])):
                caption = m.group(2)
            else:
                continue
            if name and caption.strip():
                rows.append((name, caption))
    base = path.parent
    return _records_from_rows(path, rows, images_root=images_root, max_samples=max_samples,
                              extra_candidates=(base / "flickr30k_images", base / "flickr30k-images"))
