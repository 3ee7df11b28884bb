"""Reading rows of the image collection: by id, by filter (bounded or iterated), and the ids stored at paths.

Every read asks for Strong consistency: a write acknowledged through any replica is seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ..locations import MilvusLocation
from .connection import QUERY_LIMIT, STRONG, MilvusClient, in_list, milvus_errors

ROWS_PER_CALL = 1000
PATHS_PER_QUERY = 4096  # one pass over the collection each in Milvus Lite; fewer, larger lists are faster


class CollectionRows:
    """Row reads on one collection through one client."""

    def __init__(self, client: MilvusClient, where: MilvusLocation) -> None:
        self._client, self._where, self._name = client, where, where.collection

    def by_id(self, ids: Sequence[int], fields: list[str]) -> dict[int, dict[str, Any]]:
        """The rows with these ids (missing ones left out), keyed by id."""
        out: dict[int, dict[str, Any]] = {}
        unique = list(dict.fromkeys(int(i) for i in ids))
        with milvus_errors(self._where, "reading records"):
            for start in range(0, len(unique), ROWS_PER_CALL):
                part = unique[start:start + ROWS_PER_CALL]
                for row in self._client.get(self._name, ids=part, output_fields=fields, consistency_level=STRONG):
                    out[int(row["id"])] = row
        return out

    def scan(self, expression: str, fields: list[str]) -> Iterator[dict[str, Any]]:
        """Every row matching `expression`, in batches (for listings of any size)."""
        with milvus_errors(self._where, "listing records"):
            it = self._client.query_iterator(self._name, batch_size=4096, filter=expression, output_fields=fields,
                                             consistency_level=STRONG)
            try:
                while rows := it.next():
                    yield from rows
            finally:
                it.close()

    def matching(self, expression: str, fields: list[str]) -> list[dict[str, Any]]:
        """Rows matching `expression` in one query when they fit in one (an iterator costs a pass per batch)."""
        with milvus_errors(self._where, "reading records"):
            rows = self._client.query(self._name, filter=expression, output_fields=fields, limit=QUERY_LIMIT,
                                      consistency_level=STRONG)
        return rows if len(rows) < QUERY_LIMIT else list(self.scan(expression, fields))

    def ids_at_paths(self, paths: Sequence[str], exclude: set[int] = frozenset()) -> list[int]:
        """Ids of the rows stored at any of `paths`, other than `exclude`."""
        ids: set[int] = set()
        for start in range(0, len(paths), PATHS_PER_QUERY):
            ids.update(int(r["id"]) for r in self.matching(in_list("path", paths[start:start + PATHS_PER_QUERY]), ["id"]))
        return sorted(ids - set(exclude))
