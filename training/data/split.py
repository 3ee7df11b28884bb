"""Deterministic train/val split by image key."""

from __future__ import annotations

import hashlib

from .errors import DataError
from .records import Record, RecordSet


def key_unit(key: str, salt: str) -> float:
    """A uniform number in [0, 1) from a key: the same key always lands in the same place."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_records(record_set: RecordSet, val_fraction: float, seed: int = 0) -> tuple[RecordSet, RecordSet]:
    """Split by a hash of each image key: all captions of an image stay on one side.

    Each record's side depends only on its own key and the seed, never on the other
    records, so adding images to a data set never moves an existing image across the
    split. The val share is therefore about (not exactly) val_fraction; if hashing leaves
    one side empty while both could be non-empty, the record nearest the threshold moves.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    salt = f"split:{seed}"
    scored = [(key_unit(r.key, salt), r) for r in record_set.records]
    train = [r for u, r in scored if u >= val_fraction]
    val = [r for u, r in scored if u < val_fraction]
    if val_fraction > 0 and len(record_set.records) >= 2:
        if not val:
            closest = min(scored, key=lambda ur: ur[0])[1]
            train = [r for r in train if r is not closest]
            val = [closest]
        elif not train:
            closest = max(scored, key=lambda ur: ur[0])[1]
            val = [r for r in val if r is not closest]
            train = [closest]

    def _part(part: list[Record], suffix: str) -> RecordSet:
        return RecordSet(f"{record_set.name}:{suffix}", part, class_names=record_set.class_names,
                         templates=record_set.templates)

    return _part(train, "train"), _part(val, "val")
