"""manifest.json: what an index generation holds and which checkpoint made it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.fileio import utc_timestamp

from .errors import IndexStoreError

FORMAT_VERSION = 1
METRIC = "inner_product"  # on L2-normalised vectors, i.e. cosine similarity


@dataclass
class Manifest:
    """Everything needed to interpret the FAISS file and the SQLite metadata next to it."""

    model_id: str
    dim: int
    index_type: str  # flat | hnsw | ivfpq: what the FAISS file is
    requested_type: str  # auto | flat | hnsw | ivfpq: what the user asked for
    params: dict[str, Any]
    root: str  # images root: relative to the index directory when inside it, else absolute
    uploads: str = "uploads"  # the folder of the files the index stores itself (add_bytes, --copy)
    # True: that folder is in the index directory, so a copy of the folder is independent (every index made
    # since issue 16); False, or absent from an older manifest: it is under the root, as those were made
    uploads_in_index: bool = False
    count: int = 0
    tombstones: int = 0
    delta_count: int = 0  # vectors in the generation's delta segment (segments.py); 0: it has none
    next_id: int = 1
    generation: int = 1
    metric: str = METRIC
    created: str = field(default_factory=utc_timestamp)
    updated: str = field(default_factory=utc_timestamp)
    checkpoint_path: str | None = None  # a hint for the CLI; the hash is what is checked
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise IndexStoreError(f"{path} is missing: the index is damaged") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IndexStoreError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise IndexStoreError(f"{path}: unsupported index format {data.get('format') if isinstance(data, dict) else '?'}")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise IndexStoreError(f"{path} lacks required fields: {exc}") from exc
