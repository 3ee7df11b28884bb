"""Creating an index's two collections with their binding record, and opening existing ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.fileio import utc_timestamp

from ..errors import IndexExistsError, IndexNotFoundError, IndexStoreError
from ..locations import MilvusLocation
from .connection import (
    MilvusClient,
    create_collections,
    files_collection,
    milvus_errors,
    require_collections,
)
from .files import ImageFiles

FORMAT = "clipforge-milvus-1"
TYPES = ("auto", "flat", "hnsw")  # auto: HNSW (Milvus cannot change a built index type later)
DEFAULT_PARAMS = {"hnsw_m": 32, "ef_construction": 200, "ef_search": 128}  # the FAISS store's HNSW defaults


def checked_params(given: dict[str, Any] | None) -> dict[str, int]:
    params = dict(DEFAULT_PARAMS)
    for key, value in (given or {}).items():
        if key not in DEFAULT_PARAMS:
            raise IndexStoreError(f"the Milvus store takes --hnsw-m, --ef-construction and --ef-search, not --{key.replace('_', '-')}")
        if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 8192:
            raise IndexStoreError(f"{key} must be an integer from 2 to 8192, got {value!r}")
        params[key] = value
    return params


def new_collections(
    client: MilvusClient, where: MilvusLocation, *, model_id: str, dim: int, index_type: str,
    root: str | Path | None, params: dict[str, Any] | None, checkpoint_path: str | Path | None, uploads: str,
    max_image_bytes: int,
) -> dict[str, Any]:
    """Create the collections and write the record binding them to `model_id`; returns the record."""
    if index_type not in TYPES:
        raise IndexStoreError(f"the Milvus store builds {', '.join(TYPES)} indexes, not {index_type!r}")
    kind = "hnsw" if index_type == "auto" else index_type
    checked = checked_params(params)
    names = (where.collection, files_collection(where.collection))
    with milvus_errors(where, "creating the collections"):
        present = [client.has_collection(n) for n in names]
        if any(present) and not all(present):
            raise IndexExistsError(f"Milvus {where.text}: collection {names[present.index(True)]} exists and is not "
                                   "a clipforge index; pick another collection name")
        if all(present):
            client.load_collection(names[1])
            if ImageFiles(client, where).read_meta() is not None:
                raise IndexExistsError(f"Milvus {where.text} already holds an index; use `clipforge index add` "
                                       "(duplicates are skipped)")
            for name in names:  # a create killed before it wrote its record
                client.drop_collection(name)
        create_collections(client, where.collection, dim=dim, index_type=kind, params=checked)
        for name in names:
            client.load_collection(name)
    now = utc_timestamp()
    meta = {
        "format": FORMAT, "model_id": model_id, "dim": int(dim), "metric": "ip", "index_type": kind,
        "requested_type": index_type, "params": checked,
        "root": str(Path(root).resolve()) if root is not None else None, "uploads": uploads,
        "checkpoint_path": str(Path(checkpoint_path).resolve()) if checkpoint_path else None,
        "max_image_bytes": int(max_image_bytes), "created": now, "updated": now,
    }
    ImageFiles(client, where).write_meta(meta)  # last: the collections are an index once this is written
    return meta


def existing_collections(client: MilvusClient, where: MilvusLocation) -> dict[str, Any]:
    """Load an index's collections; returns its binding record."""
    require_collections(client, where)
    with milvus_errors(where, "loading the collections"):
        for name in (where.collection, files_collection(where.collection)):
            client.load_collection(name)
    meta = ImageFiles(client, where).read_meta()
    if meta is None or meta.get("format") != FORMAT:
        raise IndexNotFoundError(f"Milvus {where.text} holds no clipforge index record (a create that did not "
                                 "finish?); build it again with `clipforge index build`")
    return meta
