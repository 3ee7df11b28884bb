"""root/<class>/*.jpg folders: class names from folder names, captions from templates."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from model import DEFAULT_TEMPLATES
from model.image import IMAGE_SUFFIXES

from .errors import DataError
from .records import Record, RecordSet


def class_name_from_folder(folder: str) -> str:
    """"golden_retriever" -> "golden retriever": the words a caption would use."""
    return " ".join(folder.replace("_", " ").split())


def fill_template(template: str, name: str) -> str:
    """"a photo of a {}." with "cat" -> "a photo of a cat." (a template without {} gets the name appended)."""
    return template.replace("{}", name) if "{}" in template else f"{template} {name}"


def _images_under(folder: Path) -> list[str]:
    """Paths (relative to folder, '/'-separated, sorted) of image files under it; hidden entries skipped.

    Plain strings rather than Path objects: cheaper per file, which counts in folders of tens of thousands.
    """
    found: list[str] = []
    top = str(folder)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, top).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        found += [prefix + f for f in filenames if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found)


def looks_like_imagefolder(root: Path) -> bool:
    """True when root has class subfolders with images directly inside at least one of them."""
    for d in root.iterdir():
        if (d.is_dir() and not d.name.startswith(".")
                and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir() if f.is_file())):
            return True
    return False


def load_imagefolder(
    root: Path, templates: Sequence[str] | None = None, max_samples: int | None = None
) -> RecordSet:
    """One record per image, its captions the templates filled with the class name.

    Records are interleaved across classes (first image of each class, then the second...)
    so that max_samples, which keeps the first N, still spans every class.
    """
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    root = root.resolve()
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class subfolders (expected root/<class>/*.jpg)")
    per_class = [_images_under(d) for d in class_dirs]
    if not any(per_class):
        raise DataError(f"image folder {root} has class subfolders but no images in them")
    if not looks_like_imagefolder(root):
        names = ", ".join(d.name for d in class_dirs[:5])
        raise DataError(
            f"{root} holds folders ({names}) whose images are one level deeper; this looks like a folder of "
            "splits: point at one of them (e.g. .../train)"
        )
    temps = list(templates) if templates else list(DEFAULT_TEMPLATES)
    class_names = [class_name_from_folder(d.name) for d in class_dirs]
    class_captions = [tuple(dict.fromkeys(fill_template(t, name) for t in temps)) for name in class_names]
    records: list[Record] = []
    longest = max(len(p) for p in per_class)
    for j in range(longest):
        for label, paths in enumerate(per_class):
            if j < len(paths):
                key = f"{class_dirs[label].name}/{paths[j]}"
                records.append(Record(key, f"{root}/{key}", class_captions[label], label=label))
                if max_samples is not None and len(records) >= max_samples:
                    return RecordSet(root.name, records, class_names=class_names, templates=temps)
    return RecordSet(root.name, records, class_names=class_names, templates=temps)
