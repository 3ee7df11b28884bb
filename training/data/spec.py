"""DataSpec: which data source to read and how, from a config file or a `kind:path?opt=v` string."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import DataError

Kind = Literal["imagefolder", "csv", "flickr30k", "json", "llava", "coco", "parquet", "webdataset", "shapes"]
KINDS: tuple[str, ...] = Kind.__args__  # type: ignore[attr-defined]
_SHAPES_ONLY = ("split", "n_train", "n_val", "img_size", "seed")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


class DataSpec(BaseModel):
    """A data source: its kind, its path, and the few options its format needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    path: str = Field(min_length=1)
    images_root: str | None = None
    image_column: str | None = None  # csv, parquet
    caption_column: str | None = None  # csv, parquet
    separator: str | None = None  # csv: ',' '\t' '|' ';' (detected from the header when unset)
    templates: list[str] | None = None  # imagefolder captions, and zero-shot prompts
    max_samples: int | None = Field(default=None, gt=0)  # keep the first N images (a slice for debugging)
    # shapes only: which split to load, and the generation parameters used when the folder is absent
    split: Literal["train", "val", "heldout", "seen"] | None = None
    n_train: int | None = Field(default=None, gt=0)
    n_val: int | None = Field(default=None, ge=0)
    img_size: int | None = Field(default=None, ge=16, le=1024)
    seed: int | None = None

    @field_validator("separator", mode="before")
    @classmethod
    def _separator(cls, v: object) -> object:
        aliases = {"tab": "\t", "\\t": "\t", "pipe": "|", "comma": ",", "semicolon": ";"}
        v = aliases.get(v, v) if isinstance(v, str) else v
        if v is not None and (not isinstance(v, str) or len(v) != 1):
            raise ValueError("separator must be one character (or tab, pipe, comma, semicolon)")
        return v

    @field_validator("templates", mode="before")
    @classmethod
    def _templates(cls, v: object) -> object:
        if isinstance(v, str):
            v = [t for t in v.split("|") if t.strip()]
        if isinstance(v, list) and not v:
            raise ValueError("templates must not be empty")
        return v

    @model_validator(mode="after")
    def _kind_options(self) -> DataSpec:
        if self.kind != "shapes":
            given = [k for k in _SHAPES_ONLY if getattr(self, k) is not None]
            if given:
                raise ValueError(f"options {given} apply to shapes data only")
        if self.kind not in ("csv", "parquet") and (self.image_column or self.caption_column):
            raise ValueError("image_column/caption_column apply to csv and parquet data only")
        if self.kind != "csv" and self.separator is not None:
            raise ValueError("separator applies to csv data only")
        return self


def _is_brace_pattern(path: str) -> bool:
    return bool(_BRACES.search(path))


def detect_kind(path: str) -> tuple[str, str]:
    """(kind, path) guessed from what is at path; a folder may resolve to the caption file inside it."""
    if _is_brace_pattern(path):
        return "webdataset", path
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {path} does not exist")
    if p.is_dir():
        from .imagefolder import looks_like_imagefolder
        from .shapes import read_manifest

        if read_manifest(p) is not None:
            return "shapes", str(p)
        for name, kind in (("captions.txt", "csv"), ("captions.csv", "csv"), ("results.csv", None)):
            if (p / name).is_file():
                return detect_kind(str(p / name)) if kind is None else (kind, str(p / name))
        if looks_like_imagefolder(p):
            return "imagefolder", str(p)
        if any(p.glob("*.parquet")) or any(p.glob("*/*.parquet")):
            return "parquet", str(p)
        if any(p.glob("*.tar")):
            return "webdataset", str(p)
        splits = [d.name for d in sorted(p.iterdir()) if d.is_dir() and looks_like_imagefolder(d)]
        if splits:
            raise DataError(
                f"{path} looks like a folder of splits ({', '.join(splits[:5])}), each an image folder: "
                "point at one of them"
            )
        raise DataError(
            f"cannot tell the format of folder {path}: expected class subfolders of images, captions.txt, "
            "parquet files or .tar shards; name it with a prefix such as csv:, json:, coco:, imagefolder:"
        )
    suffix = p.suffix.lower()
    if suffix == ".tar":
        return "webdataset", str(p)
    if suffix == ".parquet":
        return "parquet", str(p)
    if suffix in (".json", ".jsonl"):
        from .captions_json import sniff_json_kind

        return sniff_json_kind(p), str(p)
    if suffix in (".csv", ".txt", ".tsv"):
        with p.open("r", encoding="utf-8-sig", errors="replace") as f:
            header = f.readline()
        if "|" in header and "comment" in header.lower():
            return "flickr30k", str(p)
        return "csv", str(p)
    if p.name.lower().endswith((".tar.gz", ".tgz")):
        raise DataError(
            f"{path} is a compressed archive: extract an image folder or caption set from it first, "
            "or name gzipped shards with the webdataset: prefix"
        )
    raise DataError(f"cannot tell the format of {path} from its suffix {suffix!r}; name it with a kind: prefix")


def parse_data_spec(text: str) -> DataSpec:
    """Parse "kind:path?option=value&..." (kind optional: detected from the path).

    Examples: "csv:/data/captions.txt", "imagefolder:/data/cifar10/train?templates=a photo of a {}.",
    "webdataset:/data/shard-{000..009}.tar", "shapes:/cache/shapes?img_size=32".
    """
    if not isinstance(text, str) or not text.strip():
        raise DataError("empty data spec; give a path, optionally prefixed with a kind such as csv:")
    text = text.strip()
    kind: str | None = None
    head, sep, rest = text.partition(":")
    if sep and head in KINDS:
        kind, text = head, rest
    elif sep and re.fullmatch(r"[a-z0-9]+", head) and not rest.startswith("//") and len(head) > 1:
        raise DataError(f"unknown data kind {head!r}; known kinds: {', '.join(KINDS)}")
    path, _, query = text.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    if not path:
        raise DataError(f"data spec {text!r} has no path")
    if kind is None:
        kind, path = detect_kind(path)
    try:
        spec = DataSpec(kind=kind, path=path, **options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise DataError(f"invalid data spec {text!r}: {problems}") from None
    if kind == "shapes":
        from .shapes import ensure_shapes

        ensure_shapes(spec)
    return spec
