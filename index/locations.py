"""Where an index lives: a FAISS directory (the default), a Milvus server collection or a Milvus Lite one.

    indexes/photos                          a FAISS index directory
    milvus://HOST:PORT/COLLECTION           a collection on a Milvus standalone or cluster (plain gRPC/HTTP)
    milvus+https://HOST:PORT/COLLECTION     the same over TLS (e.g. a managed Milvus)
    milvus-lite:PATH.db/COLLECTION          a collection in a Milvus Lite data folder (one process at a time)
    photos.milvus                           a location file: a text file whose first line is one of the above

The token for a server (user:password or an API key) comes from CLIPFORGE_MILVUS_TOKEN, never
from the location, so locations can be logged. A location file lets a setting that takes a path
(CLIPFORGE_INDEX, `serve --index`) point at a Milvus collection. Nothing here imports pymilvus.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import IndexStoreError

if TYPE_CHECKING:
    from model import CLIPInference

    from .protocol import IndexStore

TOKEN_ENV = "CLIPFORGE_MILVUS_TOKEN"
LOCATION_FILE_MAX_BYTES = 4096
_COLLECTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")  # Milvus names; 200 leaves room for our suffix
_HOST_PORT_RE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")
_SERVER_SCHEMES = {"milvus": "http", "milvus+https": "https"}


@dataclass(frozen=True)
class MilvusLocation:
    """A collection on a Milvus server (uri http(s)://HOST:PORT) or in a Milvus Lite data folder (uri PATH.db)."""

    uri: str
    collection: str
    text: str  # the location as written, for messages
    lite: bool

    @property
    def token(self) -> str:
        return "" if self.lite else os.environ.get(TOKEN_ENV, "")


def _bad(text: str, why: str) -> IndexStoreError:
    return IndexStoreError(f"index location {text!r}: {why}")


def _collection(text: str, name: str) -> str:
    if not _COLLECTION_RE.match(name):
        raise _bad(text, f"collection name {name!r} must be letters, digits and underscores, starting with a "
                         "letter or underscore (at most 200)")
    return name


def _server(text: str, scheme: str, rest: str) -> MilvusLocation:
    address, slash, name = rest.partition("/")
    if not slash or not name:
        raise _bad(text, f"give the collection: {scheme}://HOST:PORT/COLLECTION")
    match = _HOST_PORT_RE.match(address)
    if not match or not 0 < int(match.group("port")) < 65536:
        raise _bad(text, f"{address!r} is not HOST:PORT (Milvus listens on 19530 by default)")
    if "?" in name or "#" in name or "/" in name:
        raise _bad(text, "the collection is the last part of the location; it takes no query, fragment or folder")
    return MilvusLocation(f"{_SERVER_SCHEMES[scheme]}://{address}", _collection(text, name), text, lite=False)


def _lite(text: str, rest: str) -> MilvusLocation:
    folder, slash, name = rest.rpartition("/")
    if not slash or not folder.endswith(".db") or len(folder) <= 3:
        raise _bad(text, "a Milvus Lite location is milvus-lite:PATH.db/COLLECTION (the data folder ends in .db)")
    return MilvusLocation(str(Path(folder).expanduser().resolve()), _collection(text, name), text, lite=True)


def parse_milvus(text: str) -> MilvusLocation:
    """A Milvus location string -> MilvusLocation; one clear line for anything malformed."""
    scheme, _, rest = text.partition(":")
    if scheme == "milvus-lite":
        return _lite(text, rest)
    if scheme in _SERVER_SCHEMES:
        if not rest.startswith("//"):
            raise _bad(text, f"write {scheme}://HOST:PORT/COLLECTION (two slashes)")
        return _server(text, scheme, rest[2:])
    raise _bad(text, "not a Milvus location (milvus://HOST:PORT/COLLECTION or milvus-lite:PATH.db/COLLECTION)")


def is_milvus_text(text: str) -> bool:
    return text.startswith(("milvus://", "milvus+https://", "milvus-lite:", "milvus:/", "milvus+https:/"))


def _read_location_file(path: Path) -> str:
    try:
        if path.stat().st_size > LOCATION_FILE_MAX_BYTES:
            raise IndexStoreError(f"{path} is not an index location file (larger than {LOCATION_FILE_MAX_BYTES} bytes)")
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexStoreError(f"cannot read index location file {path}: {exc}") from exc
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            if not is_milvus_text(line):
                raise IndexStoreError(f"{path} is a file, not an index folder, and its first line is not a Milvus location")
            return line
    raise IndexStoreError(f"index location file {path} is empty")


def resolve_location(location: str | Path) -> Path | MilvusLocation:
    """A FAISS index folder (Path) or a Milvus collection, from a CLI argument, a setting or a location file.

    A pathlib.Path folds "milvus://" to "milvus:/", so that form is read back as the URL it was.
    """
    text = str(location)
    if isinstance(location, Path) and re.match(r"^milvus(\+https)?:/[^/]", text):
        text = text.replace(":/", "://", 1)
    if is_milvus_text(text):
        return parse_milvus(text)
    path = Path(text)
    if path.is_file():
        return parse_milvus(_read_location_file(path))
    return path


def open_index(location: str | Path, *, model_id: str | None = None, mmap: bool = False, **milvus: Any) -> IndexStore:
    """Open the index at `location` (see the module docstring); with model_id, refuse another checkpoint's."""
    where = resolve_location(location)
    if isinstance(where, Path):
        from .image_index import ImageIndex

        return ImageIndex.open(where, model_id=model_id, mmap=mmap)
    from .milvus import MilvusImageIndex

    return MilvusImageIndex.open(where, model_id=model_id, **milvus)


def create_index(
    location: str | Path, clip: CLIPInference | str, *, dim: int | None = None, index_type: str = "auto",
    root: str | Path | None = None, params: dict[str, Any] | None = None, checkpoint_path: str | Path | None = None,
) -> IndexStore:
    """A new, empty index at `location` bound to the checkpoint of `clip` (or model id + dim)."""
    where = resolve_location(location)
    if isinstance(where, Path):
        from .image_index import ImageIndex

        return ImageIndex.create(where, clip, dim=dim, index_type=index_type, root=root, params=params,
                                 checkpoint_path=checkpoint_path)
    from .milvus import MilvusImageIndex

    return MilvusImageIndex.create(where, clip, dim=dim, index_type=index_type, root=root, params=params,
                                   checkpoint_path=checkpoint_path)


def index_exists(location: str | Path) -> bool:
    """Whether `location` already holds an index (a FAISS CURRENT file, or the Milvus collection)."""
    where = resolve_location(location)
    if isinstance(where, Path):
        from . import store

        return store.is_index_dir(where)
    from .milvus import collection_exists

    return collection_exists(where)
