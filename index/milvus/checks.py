"""`clipforge index info --verify` on a Milvus collection: every row's id, time added and stored bytes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import IndexStoreError
from ..search_filter import parse_utc
from .files import ImageFiles
from .writes import content_id


def verify_rows(rows: Iterable[dict[str, Any]], files: ImageFiles, where_text: str) -> dict[str, int]:
    """Check rows (id, sha256, chunks, added): id from its hash, a valid time, all byte chunks present."""
    rows = list(rows)
    problems = []
    bad_ids = [r["id"] for r in rows if content_id(r["sha256"]) != int(r["id"])]
    if bad_ids:
        problems.append(f"{len(bad_ids)} id(s) not derived from their content hash (e.g. {bad_ids[0]})")
    for r in rows:
        try:
            parse_utc(r["added"], "added")
        except IndexStoreError:
            problems.append(f"image {r['id']} has a damaged time added")
            break
    stored = [int(r["id"]) for r in rows if int(r["chunks"])]
    counts = files.count_chunks(stored)
    short = [r["id"] for r in rows if int(r["chunks"]) and counts.get(int(r["id"]), 0) != int(r["chunks"])]
    if short:
        problems.append(f"{len(short)} image(s) with missing or extra byte chunks (e.g. {short[0]})")
    if problems:
        raise IndexStoreError(f"index {where_text} is inconsistent: " + "; ".join(problems))
    return {"count": len(rows), "stored_images": len(stored), "chunks": sum(counts.values())}
