"""Parquet image-caption tables, the form Hugging Face image-caption data sets are published in."""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError
from .locate import image_path
from .records import RecordBuilder, RecordSet

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "image_path", "file_name", "filename", "path")
CAPTION_COLUMNS = ("caption", "text", "captions", "blip_caption", "description", "sentence", "sentences", "prompt", "title")


def parquet_files(path: str) -> list[Path]:
    """A file, every *.parquet under a folder (sorted), or a glob pattern."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if f.endswith(".parquet"))
    if not files:
        raise DataError(f"no parquet files at {path}")
    return files


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and any(t.field(i).name in ("bytes", "path") for i in range(t.num_fields))


def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_string(t.value_type)


def _pick(
    schema: pa.Schema, wanted: str | None, *, known: tuple[str, ...], ok: Callable[[pa.DataType], bool], what: str,
    name: str,
) -> str:
    names = {n.lower(): n for n in schema.names}
    if wanted is not None:
        if wanted in schema.names:
            return wanted
        if wanted.lower() in names:
            return names[wanted.lower()]
        raise DataError(f"{name} has no column {wanted!r}; its columns are {schema.names}")
    for k in known:
        if k in names and ok(schema.field(names[k]).type):
            return names[k]
    typed = [f.name for f in schema if ok(f.type)]
    if len(typed) == 1:
        return typed[0]
    raise DataError(f"cannot tell which column of {name} holds the {what} (columns: {schema.names}); set {what}_column")


def _image_value(value: Any, root: Path) -> tuple[str, str | bytes] | None:
    """(key, image) from a bytes cell, a {"bytes", "path"} struct or a path string."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return _image_value(data, root)
        value = path
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        return "blake2b:" + hashlib.blake2b(data, digest_size=12).hexdigest(), data
    if isinstance(value, str) and value:
        return value, image_path(root, value)
    return None


def load_parquet(
    path: str, *, images_root: str | None = None, image_column: str | None = None, caption_column: str | None = None,
    max_samples: int | None = None,
) -> RecordSet:
    """One record per distinct image; embedded bytes are kept in memory and keyed by their content hash.

    Relative image paths (path-only cells) resolve against images_root, else the folder
    of the parquet file.
    """
    files = parquet_files(path)
    builder = RecordBuilder(max_samples)
    for f in files:
        try:
            table = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{f} is not a readable parquet file: {exc}") from exc
        schema = table.schema_arrow
        image_col = _pick(schema, image_column, known=IMAGE_COLUMNS,
                          ok=lambda t: _is_image_type(t) or pa.types.is_string(t), what="image", name=f.name)
        caption_col = _pick(schema, caption_column, known=CAPTION_COLUMNS, ok=_is_text_type, what="caption",
                            name=f.name)
        if image_col == caption_col:
            raise DataError(f"{f.name}: image and caption columns are both {image_col!r}; "
                            "set image_column and caption_column")
        root = Path(images_root).expanduser() if images_root else f.parent
        try:
            for batch in table.iter_batches(batch_size=512, columns=[image_col, caption_col]):
                for img, cap in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    got = _image_value(img, root)
                    if got is None or cap is None:
                        continue
                    caps = [str(c) for c in cap if c] if isinstance(cap, list) else [str(cap)]
                    builder.add(got[0], got[1], caps)
                if builder.full:
                    break
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"cannot read {f}: {exc}") from exc
        if builder.full:
            break
    records = builder.build()
    if not records:
        raise DataError(f"no image-caption rows in {path}")
    return RecordSet(Path(path).stem or "parquet", records)
