"""The one place pymilvus is met: the client for a location, its errors as one line, filter literals, schemas.

The same MilvusClient calls serve a Milvus cluster or standalone (uri http://HOST:PORT) and
Milvus Lite (uri PATH.db: pymilvus starts milvus-lite's server inside this process). Every read
asks for Strong consistency, so a write acknowledged through one replica is seen by the next
read through any other.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import IndexNotFoundError, IndexStoreError, IndexUnavailableError
from ..locations import MilvusLocation
from ..search_filter import SearchFilter

try:
    from pymilvus import DataType, MilvusClient, MilvusException
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise IndexStoreError(
        "the Milvus index store needs pymilvus (and milvus-lite for milvus-lite: locations): "
        "pip install 'clipforge[milvus]'"
    ) from exc

# pymilvus logs every failed call with a traceback at ERROR; the store raises one-line errors instead.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
_CONNECT_FAILED = 2  # pymilvus's Status.CONNECT_FAILED: the server did not answer

STRONG = "Strong"
FILES_SUFFIX = "__files"  # the companion collection: image bytes in chunks, and the binding record
CONNECT_TIMEOUT_S = 10.0
PATH_BYTES = 4096
CAPTION_BYTES = 16384
CHUNK_BYTES = 48_000  # raw bytes per chunk row: 64,000 characters of base64, under VARCHAR's 65,535
QUERY_LIMIT = 16_384  # Milvus's largest limit (offset + limit) of one query or search
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class MilvusUnavailableError(IndexUnavailableError):
    """The Milvus server did not answer (down, unreachable, too slow): a 503 for the service, not the request's fault."""


def _unreachable(exc: BaseException) -> bool:
    if getattr(exc, "code", None) == _CONNECT_FAILED and isinstance(exc, MilvusException):
        return True
    code = getattr(exc, "code", None)
    if callable(code) and type(exc).__module__.startswith("grpc"):
        try:
            return getattr(code(), "name", "") in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        except Exception:  # noqa: BLE001 - a grpc error without a status
            return False
    return "Fail connecting to server" in str(exc) or "DEADLINE_EXCEEDED" in str(exc)


def _first_line(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return str(message).strip().splitlines()[0] if str(message).strip() else type(exc).__name__


@contextmanager
def milvus_errors(where: MilvusLocation, doing: str) -> Iterator[None]:
    """Turn pymilvus and milvus-lite failures into one-line IndexStoreErrors naming the location."""
    try:
        yield
    except IndexStoreError:
        raise
    except Exception as exc:  # grpc and milvus-lite errors reach us unwrapped
        if not isinstance(exc, MilvusException) and type(exc).__module__.split(".")[0] not in (
                "pymilvus", "grpc", "milvus_lite"):
            raise
        kind = MilvusUnavailableError if _unreachable(exc) else IndexStoreError
        raise kind(f"Milvus {where.text}: {doing} failed: {_first_line(exc)}") from exc


_lite_users: dict[str, int] = {}  # open handles per Milvus Lite folder in this process
_lite_lock = threading.Lock()


def connect(where: MilvusLocation) -> MilvusClient:
    """A client for the location's server, or for its Milvus Lite folder (started in this process once)."""
    if where.lite:
        try:
            import milvus_lite  # noqa: F401  (pymilvus starts it for a .db uri)
        except ImportError as exc:
            raise IndexStoreError("milvus-lite: locations need the milvus-lite package: pip install 'clipforge[milvus]'") from exc
        if not Path(where.uri).parent.is_dir():
            raise IndexStoreError(f"Milvus Lite folder {where.uri}: its parent folder does not exist")
        # the Lite server runs in this process: grpc logs its unimplemented calls (which pymilvus tolerates), and
        # milvus-lite a folder it cannot lock, with tracebacks; the one-line errors below say what went wrong
        for name in ("grpc._server", "milvus_lite"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with milvus_errors(where, "connecting"):
        try:
            client = MilvusClient(uri=where.uri, token=where.token, timeout=CONNECT_TIMEOUT_S)
        except MilvusException as exc:
            if where.lite:  # milvus-lite logs why (most often: another process holds the folder's lock)
                raise IndexStoreError(
                    f"Milvus Lite folder {where.uri} cannot be opened ({_first_line(exc)}); another process may "
                    f"hold it: run `milvus-lite server --data-dir {where.uri} --port 19530` once and point every "
                    f"process at milvus://127.0.0.1:19530/{where.collection}"
                ) from exc
            raise
    if where.lite:
        with _lite_lock:
            _lite_users[where.uri] = _lite_users.get(where.uri, 0) + 1
    return client


def disconnect(client: MilvusClient, where: MilvusLocation) -> None:
    """Close a client; the last one of a Milvus Lite folder stops its server, releasing the folder's lock."""
    client.close()
    if not where.lite:
        return
    with _lite_lock:
        left = _lite_users.get(where.uri, 1) - 1
        if left > 0:
            _lite_users[where.uri] = left
            return
        _lite_users.pop(where.uri, None)
    from milvus_lite import server_manager_instance

    server_manager_instance.release_server(where.uri)


def files_collection(name: str) -> str:
    return name + FILES_SUFFIX


def require_collections(client: MilvusClient, where: MilvusLocation) -> None:
    with milvus_errors(where, "opening the collection"):
        missing = [n for n in (where.collection, files_collection(where.collection)) if not client.has_collection(n)]
    if missing:
        raise IndexNotFoundError(f"Milvus {where.text}: no clipforge index there (collection {missing[0]} is missing); "
                                 "create one with `clipforge index build --out LOCATION`")


def create_collections(client: MilvusClient, name: str, *, dim: int, index_type: str, params: dict[str, int]) -> None:
    """The image collection (vector + metadata) and its companion for image bytes and the binding record."""
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("path", DataType.VARCHAR, max_length=PATH_BYTES)
    schema.add_field("caption", DataType.VARCHAR, max_length=CAPTION_BYTES, nullable=True)
    schema.add_field("width", DataType.INT32)
    schema.add_field("height", DataType.INT32)
    schema.add_field("sha256", DataType.VARCHAR, max_length=64)
    schema.add_field("added", DataType.VARCHAR, max_length=32)
    schema.add_field("added_s", DataType.INT64)  # the same time as seconds since the epoch, for filters
    schema.add_field("size_bytes", DataType.INT64)  # of the stored bytes (0: none stored)
    schema.add_field("chunks", DataType.INT32)
    index_params = client.prepare_index_params()
    if index_type == "hnsw":
        index_params.add_index("vector", index_type="HNSW", metric_type="IP",
                               params={"M": params["hnsw_m"], "efConstruction": params["ef_construction"]})
    else:
        index_params.add_index("vector", index_type="FLAT", metric_type="IP")
    index_params.add_index("sha256", index_type="INVERTED")
    index_params.add_index("path", index_type="INVERTED")
    client.create_collection(name, schema=schema, index_params=index_params, consistency_level=STRONG)

    files = client.create_schema(auto_id=False, enable_dynamic_field=False)
    files.add_field("key", DataType.VARCHAR, max_length=64, is_primary=True)
    files.add_field("image_id", DataType.INT64)
    files.add_field("seq", DataType.INT32)
    files.add_field("data", DataType.VARCHAR, max_length=65_535)
    files.add_field("unused", DataType.FLOAT_VECTOR, dim=2)  # Milvus requires a vector field in a collection
    files_params = client.prepare_index_params()
    files_params.add_index("unused", index_type="FLAT", metric_type="L2")
    files_params.add_index("image_id", index_type="INVERTED")
    client.create_collection(files_collection(name), schema=files, index_params=files_params, consistency_level=STRONG)


# ---------------------------------------------------------------------- filter expressions
def literal(value: str) -> str:
    """A Milvus string literal; control characters other than newline, return and tab are refused."""
    if any(ord(ch) < 0x20 and ch not in "\n\r\t" for ch in value):
        raise IndexStoreError(f"text {value[:40]!r} holds control characters a Milvus filter cannot express")
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in value) + '"'


def like_literal(value: str, *, prefix: bool) -> str:
    """A LIKE pattern matching `value` literally, followed by anything (prefix) or surrounded by anything."""
    escaped = re.sub(r"([\\%_])", r"\\\1", value)
    return literal(escaped + "%" if prefix else "%" + escaped + "%")


def in_list(field: str, values: Sequence[Any]) -> str:
    items = ", ".join(literal(v) if isinstance(v, str) else str(int(v)) for v in values)
    return f"{field} in [{items}]"


def filter_expression(conditions: SearchFilter | None) -> str:
    """The Milvus boolean expression of a SearchFilter ('' for no condition)."""
    if conditions is None or conditions.empty:
        return ""
    parts = []
    if conditions.path_prefix is not None:
        parts.append(f"path like {like_literal(conditions.path_prefix, prefix=True)}")
    if conditions.caption_contains is not None:
        parts.append(f"caption like {like_literal(conditions.caption_contains, prefix=False)}")
    if conditions.after_seconds is not None:
        parts.append(f"added_s >= {conditions.after_seconds}")
    if conditions.before_seconds is not None:
        parts.append(f"added_s < {conditions.before_seconds}")
    if conditions.min_width is not None:
        parts.append(f"width >= {int(conditions.min_width)}")
    if conditions.min_height is not None:
        parts.append(f"height >= {int(conditions.min_height)}")
    return " and ".join(parts)
