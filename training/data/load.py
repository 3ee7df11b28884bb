"""load_records: any map-style DataSpec -> RecordSet."""

from __future__ import annotations

from pathlib import Path

from .captions_csv import load_csv, load_flickr30k
from .captions_json import load_coco, load_json_list, load_llava
from .captions_parquet import load_parquet
from .errors import DataError
from .imagefolder import load_imagefolder
from .records import RecordSet
from .shapes import CLASS_NAMES, TEMPLATES, ensure_shapes, load_shapes_split
from .spec import DataSpec


def load_records(spec: DataSpec, max_samples: int | None = None) -> RecordSet:
    """Read a data source into one Record per image (webdataset shards stream instead: ShardDataset).

    max_samples (or spec.max_samples; the smaller wins) keeps the first N images in the
    source's order; image folders interleave classes so a slice spans all of them.
    """
    limits = [m for m in (max_samples, spec.max_samples) if m is not None]
    if any(m <= 0 for m in limits):
        raise DataError("max_samples must be positive")
    n = min(limits) if limits else None
    path = Path(spec.path).expanduser()
    if spec.kind == "imagefolder":
        loaded = load_imagefolder(path, spec.templates, n)
    elif spec.kind == "csv":
        loaded = load_csv(path, images_root=spec.images_root, image_column=spec.image_column,
                          caption_column=spec.caption_column, separator=spec.separator, max_samples=n)
    elif spec.kind == "flickr30k":
        loaded = load_flickr30k(path, spec.images_root, n)
    elif spec.kind == "json":
        loaded = load_json_list(path, spec.images_root, n)
    elif spec.kind == "llava":
        loaded = load_llava(path, spec.images_root, n)
    elif spec.kind == "coco":
        loaded = load_coco(path, spec.images_root, n)
    elif spec.kind == "parquet":
        loaded = load_parquet(spec.path, images_root=spec.images_root, image_column=spec.image_column,
                              caption_column=spec.caption_column, max_samples=n)
    elif spec.kind == "shapes":
        root = ensure_shapes(spec)
        split = spec.split or "train"
        loaded = RecordSet(f"shapes:{split}", load_shapes_split(root, split, n), class_names=list(CLASS_NAMES),
                           templates=list(spec.templates or TEMPLATES))
    else:
        raise DataError(f"{spec.kind} data is streamed, not loaded into memory: use ShardDataset for {spec.path}")
    if not loaded.records:
        raise DataError(f"no usable image-caption pairs in {spec.path}")
    if spec.templates and loaded.templates is None:
        loaded.templates = list(spec.templates)
    return loaded
