"""Synthetic shapes: determinism, reuse, held-out combinations, and loading through the spec."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    DataError,
    generate_shapes,
    held_out_names,
    load_records,
    parse_data_spec,
    shapes_eval_set,
)
from training.data.shapes import CLASS_NAMES, COLORS, SHAPES


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "s", n_train=400, n_val=40, img_size=32, seed=7, n_eval=60)


def test_deterministic_by_seed_and_reused(shapes_dir: Path, tmp_path: Path) -> None:
    again = generate_shapes(tmp_path / "again", n_train=400, n_val=40, img_size=32, seed=7, n_eval=60)
    assert _digest(again) == _digest(shapes_dir)
    other = generate_shapes(tmp_path / "other", n_train=400, n_val=40, img_size=32, seed=8, n_eval=60)
    assert _digest(other) != _digest(shapes_dir)
    before = (shapes_dir / "manifest.json").stat().st_mtime_ns
    assert generate_shapes(shapes_dir, n_train=400, n_val=40, img_size=32, seed=7, n_eval=60) == shapes_dir
    assert (shapes_dir / "manifest.json").stat().st_mtime_ns == before  # reused, not rewritten
    with pytest.raises(DataError, match="other parameters"):
        generate_shapes(shapes_dir, n_train=401, n_val=40, img_size=32, seed=7, n_eval=60)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("keep")
    with pytest.raises(DataError, match="not a shapes data set"):
        generate_shapes(tmp_path / "user", n_train=10, n_val=0)
    assert (tmp_path / "user" / "precious.txt").read_text() == "keep"


def test_held_out_combinations_never_in_training(shapes_dir: Path) -> None:
    manifest = json.loads((shapes_dir / "manifest.json").read_text())
    held = set(manifest["held_out"])
    assert held == set(held_out_names()) and len(held) == 6
    assert len(CLASS_NAMES) == 18
    # Every held-out colour and shape still appears in training with other partners.
    assert {n.split()[0] for n in held} == set(COLORS) and {n.split()[1] for n in held} == set(SHAPES)
    for split in ("train", "val"):
        items = json.loads((shapes_dir / f"{split}.json").read_text())
        text = " | ".join(c for it in items for c in it["caption"])
        for name in held:
            assert name not in text, f"{name} leaked into {split}"
    # Extra colours appear with every shape, so colour alone never tells the shape.
    singles = [c[0] for it in json.loads((shapes_dir / "train.json").read_text()) for c in [it["caption"]]
               if it.get("shape")]
    assert {s for s in singles if s.startswith("a pink ")} == {f"a pink {shape}" for shape in SHAPES}
    train = load_records(parse_data_spec(str(shapes_dir)))
    assert any(r.label is None for r in train.records)  # two-object scenes
    assert any("left of" in c or "above" in c for r in train.records for c in r.captions)
    assert all(CLASS_NAMES[r.label] not in held for r in train.records if r.label is not None)


def test_eval_sets_are_clean_single_objects(shapes_dir: Path) -> None:
    records, names = shapes_eval_set(shapes_dir)
    assert names == CLASS_NAMES and len(records) == 60
    assert {names[r.label] for r in records} == set(held_out_names())
    assert all(r.captions[0] == f"a {names[r.label]}" for r in records)
    seen, _ = shapes_eval_set(shapes_dir, "seen")
    assert {names[r.label] for r in seen}.isdisjoint(held_out_names())
    assert {names[r.label] for r in seen} | set(held_out_names()) == set(names)
    both, _ = shapes_eval_set(shapes_dir, "all")
    assert len(both) == len(records) + len(seen)
    with pytest.raises(DataError, match="'heldout', 'seen' or 'all'"):
        shapes_eval_set(shapes_dir, "train")
    # The object's colour is really in the image: the most common non-background pixel is near it.
    r = records[0]
    arr = np.asarray(Image.open(r.image).convert("RGB")).reshape(-1, 3).astype(int)
    target = np.array(COLORS[names[r.label].split()[0]])
    assert (np.abs(arr - target).sum(axis=1) < 60).sum() > 20


def test_shapes_spec_generates_when_absent(tmp_path: Path) -> None:
    spec = parse_data_spec(f"shapes:{tmp_path / 'gen'}?n_train=50&n_val=5&img_size=32&seed=1")
    assert (tmp_path / "gen" / "manifest.json").is_file()
    rs = load_records(spec)
    assert len(rs) == 50 and rs.templates == ["a {}"] and rs.class_names == CLASS_NAMES
    val = load_records(parse_data_spec(f"shapes:{tmp_path / 'gen'}?split=val"))
    assert len(val) == 5 and Image.open(val.records[0].image).size == (32, 32)


def test_generation_is_fast(tmp_path: Path) -> None:
    import time

    t = time.process_time()  # CPU time, so a busy shared machine does not fail the test
    generate_shapes(tmp_path / "fast", n_train=2000, n_val=0, img_size=32, n_eval=0)
    assert time.process_time() - t < 10.0  # about 2000 images/s of CPU time on one core


def test_folder_from_another_generator_version_is_refused(tmp_path: Path) -> None:
    out = generate_shapes(tmp_path / "old", n_train=5, n_val=0, img_size=16, n_eval=0)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = 0
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="generator version 0"):
        parse_data_spec(f"shapes:{out}")
