"""SQLite metadata of one index generation: id, path, caption, size, content hash, time added.

A committed generation's database is never modified again: readers open it read-only and
immutable (no locks, no journal), and a writer edits a private copy that becomes the next
generation, so a reader can never observe a half-applied change.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from model.fileio import fsync_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id      INTEGER PRIMARY KEY,
    path    TEXT NOT NULL UNIQUE,
    caption TEXT,
    width   INTEGER NOT NULL,
    height  INTEGER NOT NULL,
    sha256  TEXT NOT NULL UNIQUE,
    added   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY);
"""
_COLUMNS = "id, path, caption, width, height, sha256, added"
_CHUNK = 500  # stay well under SQLite's bound-parameter limit


@dataclass(frozen=True)
class ImageRecord:
    """One indexed image. path is POSIX and relative to the index root."""

    id: int
    path: str
    caption: str | None
    width: int
    height: int
    sha256: str
    added: str


def _chunks(items: Sequence, size: int = _CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MetadataReader:
    """Read-only access to a committed generation's database, shareable across threads."""

    def __init__(self, path: Path) -> None:
        uri = Path(path).resolve().as_uri() + "?mode=ro&immutable=1"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def _query(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    def _rows_where_in(self, columns: str, key: str, values: Iterable) -> list[tuple]:
        """SELECT columns for rows whose `key` is one of `values` (each asked once, in chunks)."""
        rows: list[tuple] = []
        for part in _chunks(list(dict.fromkeys(values))):
            rows += self._query(f"SELECT {columns} FROM images WHERE {key} IN ({','.join('?' * len(part))})", part)
        return rows

    def get_many(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        return {r[0]: ImageRecord(*r) for r in self._rows_where_in(_COLUMNS, "id", (int(i) for i in ids))}

    def result_fields(self, ids: Sequence[int]) -> dict[int, tuple[str, str | None, int, int]]:
        """(path, caption, width, height) by id: what a search hit shows, without the hash, the time
        and a record object per row (half the lookup's time at 1M; docs/benchmarks.md)."""
        return {r[0]: r[1:] for r in self._rows_where_in("id, path, caption, width, height", "id", ids)}

    def ids_by_hash(self, hashes: Sequence[str]) -> dict[str, int]:
        return dict(self._rows_where_in("sha256, id", "sha256", hashes))

    def ids_by_path(self, paths: Sequence[str]) -> dict[str, int]:
        return dict(self._rows_where_in("path, id", "path", paths))

    def ids_under(self, prefix: str) -> list[int]:
        """Ids of records whose path lies in the folder `prefix` (POSIX, relative)."""
        like = prefix.rstrip("/").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
        return [r[0] for r in self._query("SELECT id FROM images WHERE path LIKE ? ESCAPE '\\'", (like,))]

    def filter_rows(self, size: int) -> Iterator[list[tuple]]:
        """(id, path, caption, width, height, added) of every record by id, `size` rows at a time."""
        last = -1
        while True:
            rows = self._query("SELECT id, path, caption, width, height, added FROM images WHERE id > ? "
                               "ORDER BY id LIMIT ?", (last, size))
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def page(self, offset: int, limit: int) -> list[ImageRecord]:
        rows = self._query(f"SELECT {_COLUMNS} FROM images ORDER BY id LIMIT ? OFFSET ?", (limit, offset))
        return [ImageRecord(*r) for r in rows]

    def all_ids(self) -> list[int]:
        return [r[0] for r in self._query("SELECT id FROM images ORDER BY id")]

    def tombstones(self) -> list[int]:
        return [r[0] for r in self._query("SELECT id FROM tombstones ORDER BY id")]

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM images")[0][0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class MetadataWriter:
    """Edits a private copy that becomes the next generation; durability comes from the commit rename."""

    def __init__(self, path: Path, copy_from: Path | None = None) -> None:
        self.path = Path(path)
        if copy_from is not None:
            shutil.copyfile(copy_from, self.path)
        self._conn = sqlite3.connect(str(self.path))
        # A crash discards the whole uncommitted generation, so no journal is needed here;
        # the file is fsynced before the generation is published.
        self._conn.execute("PRAGMA journal_mode=OFF")
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.executescript(SCHEMA)

    def insert(self, records: Sequence[ImageRecord]) -> None:
        self._conn.executemany(
            f"INSERT INTO images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(r.id, r.path, r.caption, r.width, r.height, r.sha256, r.added) for r in records],
        )

    def delete(self, ids: Sequence[int]) -> None:
        self._conn.executemany("DELETE FROM images WHERE id = ?", [(int(i),) for i in ids])

    def add_tombstones(self, ids: Sequence[int]) -> None:
        self._conn.executemany("INSERT OR IGNORE INTO tombstones (id) VALUES (?)", [(int(i),) for i in ids])

    def clear_tombstones(self) -> None:
        self._conn.execute("DELETE FROM tombstones")

    def finish(self) -> None:
        """Commit, close and fsync the file."""
        self._conn.commit()
        self._conn.close()
        fsync_path(self.path)

    def abort(self) -> None:
        try:
            self._conn.close()
        except sqlite3.Error:
            pass
