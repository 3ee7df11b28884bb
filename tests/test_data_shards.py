"""Webdataset-style tar shards: brace expansion, rank x worker coverage, shuffling, bad samples."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from model import ImageTransform
from training.data import (
    DataError,
    ShardDataset,
    collate,
    expand_braces,
    parse_data_spec,
)

TRANSFORM = ImageTransform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (i * 7 % 256, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, n_shards: int, per_shard: int) -> list[str]:
    keys = []
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"s{s}/{j:04d}"
                _add(tar, f"{key}.png", _png(s * per_shard + j))
                _add(tar, f"{key}.txt", f"caption of {key}".encode())
                _add(tar, f"{key}.cls", str(j % 3).encode())
                keys.append(key)
    return keys


def test_expand_braces() -> None:
    assert expand_braces("a-{000..003}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar", "a-003.tar"]
    assert expand_braces("a-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar"]
    assert expand_braces("{x,y}/p-{0..1}.tar") == ["x/p-0.tar", "x/p-1.tar", "y/p-0.tar", "y/p-1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError, match="bad range"):
        expand_braces("a-{x..3}.tar")


def _epoch_keys(pattern: str, epoch: int, world: int = 2, workers: int = 2) -> list[str]:
    keys: list[str] = []
    for rank in range(world):
        ds = ShardDataset(pattern, TRANSFORM, seed=1, shuffle_buffer=7, rank=rank, world_size=world)
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=5, num_workers=workers, collate_fn=collate)
        for batch in loader:
            assert batch["n_bad"] == 0
            assert batch["pixels"].shape[1:] == (3, 8, 8)
            keys += batch["keys"]
    return keys


@pytest.mark.parametrize("n_shards", [5, 2])  # more shards than readers (2 ranks x 2 workers), and fewer
def test_every_sample_exactly_once_per_epoch_across_ranks_and_workers(tmp_path: Path, n_shards: int) -> None:
    expected = write_shards(tmp_path, n_shards, 9)
    pattern = str(tmp_path / f"shard-{{000..{n_shards - 1:03d}}}.tar")
    assert parse_data_spec(pattern).kind == "webdataset"
    assert ShardDataset(pattern, TRANSFORM).num_samples() == len(expected)
    e0 = _epoch_keys(pattern, 0)
    assert Counter(e0) == Counter(expected)
    e1 = _epoch_keys(pattern, 1)
    assert Counter(e1) == Counter(expected)
    assert e0 != e1  # reshuffled per epoch
    assert _epoch_keys(pattern, 0) == e0  # and deterministic


def test_sample_fields_and_shuffle_buffer(tmp_path: Path) -> None:
    write_shards(tmp_path, 1, 20)
    plain = [s for s in ShardDataset(str(tmp_path / "shard-000.tar"), TRANSFORM, shuffle=False)]
    assert [s["key"] for s in plain] == [f"s0/{j:04d}" for j in range(20)]
    assert plain[4]["caption"] == "caption of s0/0004" and plain[4]["label"] == 1
    shuffled = [s["key"] for s in ShardDataset(str(tmp_path), TRANSFORM, shuffle_buffer=8)]  # a folder of shards
    assert sorted(shuffled) == [s["key"] for s in plain] and shuffled != [s["key"] for s in plain]


def test_bad_samples_and_broken_shards_are_counted(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "bad-0.tar", "w") as tar:
        _add(tar, "a.jpg", b"not a jpeg at all")
        _add(tar, "a.txt", b"corrupt image")
        _add(tar, "b.png", _png(1))  # no caption
        _add(tar, "c.png", _png(2))
        _add(tar, "c.txt", b"fine")
    write_shards(tmp_path, 1, 3)
    data = (tmp_path / "shard-000.tar").read_bytes()
    (tmp_path / "bad-1.tar").write_bytes(data[: 3 * 1024 + 512 + 5])  # cut inside the second sample's image data
    ds = ShardDataset([str(tmp_path / "bad-{0,1}.tar")], TRANSFORM, shuffle=False)
    batch = collate(list(ds))
    assert batch["captions"] == ["fine", "caption of s0/0000"]
    assert batch["n_bad"] == 3  # corrupt image, missing caption, broken shard
    with pytest.raises(DataError, match="missing"):
        ShardDataset(str(tmp_path / "nope-{0..1}.tar"), TRANSFORM)
    with pytest.raises(DataError, match="rank"):
        ShardDataset(str(tmp_path / "bad-0.tar"), TRANSFORM, rank=2, world_size=2)


def test_write_shards_round_trip(tmp_path: Path) -> None:
    from training.data import Record, write_shards

    img = tmp_path / "a.png"
    Image.new("RGB", (12, 12), (1, 2, 3)).save(img)
    records = [Record(f"k{i}", str(img), (f"first {i}", f"second {i}"), label=i % 2) for i in range(5)]
    records.append(Record("gone", str(tmp_path / "missing.jpg"), ("never",)))
    records.append(Record("bytes", _png(3), ("from bytes",)))
    result = write_shards(records, tmp_path / "out", samples_per_shard=2)
    assert result.n_written == 6 and result.n_skipped == 1 and len(result.shards) == 3
    assert not list((tmp_path / "out").glob("*.tmp"))
    got = list(ShardDataset(result.pattern, TRANSFORM, shuffle=False))
    assert [g["caption"].split()[0] in ("first", "second", "from") for g in got] == [True] * 6
    assert [g["label"] for g in got] == [0, 1, 0, 1, 0, -1]
    ds = ShardDataset(result.pattern, TRANSFORM, shuffle=False)
    captions = {s.key: s.captions for s in ds.raw_samples() if s is not None}
    assert captions["000000000"] == ("first 0", "second 0")


def test_samples_per_epoch_gives_every_rank_the_same_count(tmp_path: Path) -> None:
    write_shards(tmp_path, 3, 5)  # 15 samples in 3 shards over 2 ranks: 10 and 5 without a quota
    pattern = str(tmp_path / "shard-{000..002}.tar")
    uneven = [len(list(ShardDataset(pattern, TRANSFORM, rank=r, world_size=2))) for r in range(2)]
    assert sorted(uneven) == [5, 10]
    counts = []
    for r in range(2):
        ds = ShardDataset(pattern, TRANSFORM, rank=r, world_size=2, samples_per_epoch=16, shuffle_buffer=4)
        got = [s["key"] for s in ds]
        counts.append(len(got))
        assert len(set(got)) == min(len(got), uneven[r])  # the short rank wraps around, no repeats before that
    assert counts == [8, 8]


def test_max_samples_keeps_the_first_n_in_stored_order(tmp_path: Path) -> None:
    write_shards(tmp_path, 3, 4)
    pattern = str(tmp_path / "shard-{000..002}.tar")
    ds = ShardDataset(pattern, TRANSFORM, max_samples=6)
    assert ds.num_samples() == 6 and len(ds.shards) == 2
    assert sorted(s["key"] for s in ds) == [f"s0/{j:04d}" for j in range(4)] + ["s1/0000", "s1/0001"]
    with pytest.raises(DataError, match="positive"):
        ShardDataset(pattern, TRANSFORM, max_samples=0)
