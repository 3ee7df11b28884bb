"""Split, per-epoch caption sampling, bad-image handling and collate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from model import ImageTransform
from training.data import (
    CaptionDataset,
    DataError,
    Record,
    RecordSet,
    check_bad_fraction,
    collate,
    split_records,
)

TRANSFORM = ImageTransform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def make_records(n: int, captions_per_image: int = 1) -> RecordSet:
    return RecordSet("t", [
        Record(f"img{i}.jpg", f"/nowhere/img{i}.jpg", tuple(f"caption {i}.{c}" for c in range(captions_per_image)))
        for i in range(n)
    ])


def test_split_is_deterministic_grouped_and_stable_when_records_are_added() -> None:
    rs = make_records(2000, captions_per_image=5)
    train, val = split_records(rs, 0.2, seed=0)
    _, val2 = split_records(rs, 0.2, seed=0)
    assert [r.key for r in val.records] == [r.key for r in val2.records]
    assert len(train) + len(val) == 2000
    assert 0.17 < len(val) / 2000 < 0.23
    # Records are whole images: every caption of a val image is in val, none in train.
    assert {r.key for r in train.records}.isdisjoint({r.key for r in val.records})
    assert all(len(r.captions) == 5 for r in val.records)
    # Adding images never moves an existing one across the split.
    bigger = RecordSet("t", rs.records + make_records(3000).records[2000:])
    _, val_big = split_records(bigger, 0.2, seed=0)
    old_keys = {r.key for r in rs.records}
    assert {r.key for r in val_big.records if r.key in old_keys} == {r.key for r in val.records}
    # Another seed gives another split; zero fraction keeps everything for training.
    _, val_other = split_records(rs, 0.2, seed=1)
    assert {r.key for r in val_other.records} != {r.key for r in val.records}
    tr0, va0 = split_records(rs, 0.0)
    assert len(tr0) == 2000 and len(va0) == 0
    with pytest.raises(DataError):
        split_records(rs, 1.0)


def test_split_of_tiny_set_keeps_both_sides_non_empty() -> None:
    train, val = split_records(make_records(2), 0.1)
    assert len(train) == 1 and len(val) == 1


def _write(path: Path, color=(10, 200, 10), size=(20, 24)) -> str:
    Image.new("RGB", size, color).save(path)
    return str(path)


def test_caption_sampling_is_per_epoch_and_deterministic(tmp_path: Path) -> None:
    img = _write(tmp_path / "a.png")
    caps = tuple(f"caption {c}" for c in range(5))
    records = [Record(f"k{i}", img, caps) for i in range(40)]
    ds = CaptionDataset(records, TRANSFORM, seed=3)
    epoch0 = [ds[i]["caption"] for i in range(40)]
    ds.set_epoch(1)
    epoch1 = [ds[i]["caption"] for i in range(40)]
    assert epoch0 != epoch1
    assert len(set(epoch0)) > 1  # different images draw different captions
    ds.set_epoch(0)
    assert [ds[i]["caption"] for i in range(40)] == epoch0
    again = CaptionDataset(records, TRANSFORM, seed=3)
    assert [again[i]["caption"] for i in range(40)] == epoch0
    item = ds[0]
    assert item["pixels"].shape == (3, 16, 16) and item["label"] == -1 and item["index"] == 0


def test_training_crops_are_reproducible_per_epoch(tmp_path: Path) -> None:
    img = Image.effect_noise((64, 48), 60).convert("RGB")
    img.save(tmp_path / "n.png")
    train_tf = ImageTransform(16, (0.5,) * 3, (0.5,) * 3, train=True, scale=(0.3, 0.6))
    ds = CaptionDataset([Record("n", str(tmp_path / "n.png"), ("x",))], train_tf, seed=0)
    a = ds[0]["pixels"]
    assert torch.equal(a, ds[0]["pixels"])
    ds.set_epoch(5)
    assert not torch.equal(a, ds[0]["pixels"])


def test_corrupt_missing_and_oversized_images_are_counted_not_raised(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = (tmp_path / "good.png").read_bytes()[:40]
    big = _write(tmp_path / "big.png", size=(300, 300))
    records = [
        Record("good", good, ("ok",), label=2),
        Record("missing", str(tmp_path / "missing.jpg"), ("gone",)),
        Record("corrupt", str(tmp_path / "corrupt.jpg"), ("bad",)),
        Record("truncated", truncated, ("bytes",)),
        Record("big", big, ("too large",)),
        Record("good-bytes", (tmp_path / "good.png").read_bytes(), ("ok bytes",)),
    ]
    ds = CaptionDataset(records, TRANSFORM, max_pixels=200 * 200)
    assert [ds[i] is None for i in range(len(records))] == [False, True, True, True, True, False]
    loader = DataLoader(ds, batch_size=6, collate_fn=collate, num_workers=0)
    batch = next(iter(loader))
    assert batch["n_bad"] == 4
    assert batch["pixels"].shape == (2, 3, 16, 16)
    assert batch["captions"] == ["ok", "ok bytes"]
    assert batch["labels"].tolist() == [2, -1] and batch["indices"].tolist() == [0, 5]
    empty = collate([None, None])
    assert empty["n_bad"] == 2 and empty["pixels"].shape[0] == 0 and empty["labels"].numel() == 0


def test_bad_fraction_budget() -> None:
    check_bad_fraction(0, 0, 0.0)
    check_bad_fraction(5, 100, 0.05)
    with pytest.raises(DataError, match=r"6 of 100 images \(6\.0%\).*5\.0%"):
        check_bad_fraction(6, 100, 0.05)
    with pytest.raises(DataError, match="between 0 and 1"):
        check_bad_fraction(0, 10, 1.5)
