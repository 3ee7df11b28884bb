"""The loaders on the real shared data: Flickr8k-1k captions.txt and a slice of the CIFAR-10 tarball."""

from __future__ import annotations

import tarfile
from pathlib import Path

from model import ImageTransform
from training.data import (
    CaptionDataset,
    collate,
    load_records,
    parse_data_spec,
    split_records,
)


def test_flickr8k_1k_captions(shared_data: Path) -> None:
    rs = load_records(parse_data_spec(str(shared_data / "flickr8k-1k" / "captions.txt")))
    assert len(rs) == 1000 and rs.num_captions == 5000
    assert all(len(r.captions) == 5 for r in rs.records)
    assert any("," in c for r in rs.records for c in r.captions)  # quoted commas survived
    train, val = split_records(rs, 0.2, seed=0)
    assert len(train) + len(val) == 1000 and 150 < len(val) < 250
    ds = CaptionDataset(val.records[:4], ImageTransform(32, (0.5,) * 3, (0.5,) * 3))
    batch = collate([ds[i] for i in range(4)])
    assert batch["n_bad"] == 0 and batch["pixels"].shape == (4, 3, 32, 32)


def test_cifar10_slice_as_image_folder(shared_data: Path, tmp_path: Path) -> None:
    per_class: dict[str, int] = {}
    with tarfile.open(shared_data / "cifar10-images.tar.gz", "r|gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] == "test" and per_class.get(parts[2], 0) < 3:
                per_class[parts[2]] = per_class.get(parts[2], 0) + 1
                tar.extract(m, tmp_path, filter="data")
            if len(per_class) == 10 and all(v == 3 for v in per_class.values()):
                break
    rs = load_records(parse_data_spec(str(tmp_path / "cifar10" / "test")))
    assert rs.class_names == sorted(per_class) and "airplane" in rs.class_names
    assert len(rs) == 30
    ds = CaptionDataset(rs.records, ImageTransform(32, (0.5,) * 3, (0.5,) * 3))
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["n_bad"] == 0 and sorted(set(batch["labels"].tolist())) == list(range(10))
    first = rs.class_names[batch["labels"][0]]
    assert batch["captions"][0] in {t.replace("{}", first) for t in rs.templates}
