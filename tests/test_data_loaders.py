"""Each map-style loader on a tiny fixture written here, plus spec parsing and format detection."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from training.data import (
    DataError,
    DataSpec,
    detect_kind,
    load_records,
    parse_data_spec,
)


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: int = 12, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, format=fmt)
    return path


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), color).save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------- image folder
def test_imagefolder_class_names_templates_and_interleaving(tmp_path: Path) -> None:
    for cls in ("golden_retriever", "cat"):
        for i in range(3):
            write_image(tmp_path / cls / f"{i}.jpg")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    rs = load_records(parse_data_spec(f"imagefolder:{tmp_path}?templates=a photo of a {{}}.|a {{}}"))
    assert rs.class_names == ["cat", "golden retriever"]
    assert rs.templates == ["a photo of a {}.", "a {}"]
    assert len(rs) == 6
    first = rs.records[0]
    assert first.key == "cat/0.jpg" and first.label == 0 and Path(first.image).is_absolute()
    assert first.captions == ("a photo of a cat.", "a cat")
    # Interleaved across classes, so a slice spans both.
    assert [r.label for r in rs.records[:4]] == [0, 1, 0, 1]
    sliced = load_records(DataSpec(kind="imagefolder", path=str(tmp_path)), max_samples=2)
    assert {r.label for r in sliced.records} == {0, 1}
    assert "a photo of a golden retriever." in sliced.records[1].captions  # default templates


def test_imagefolder_rejects_folder_of_splits(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "cat" / "0.jpg")
    write_image(tmp_path / "test" / "cat" / "0.jpg")
    with pytest.raises(DataError, match="folder of splits"):
        load_records(DataSpec(kind="imagefolder", path=str(tmp_path)))
    with pytest.raises(DataError, match=r"folder of splits \(test, train\)"):
        parse_data_spec(str(tmp_path))
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="compressed archive"):
        parse_data_spec(str(tmp_path / "x.tar.gz"))


# ---------------------------------------------------------------- csv / flickr
def test_csv_flickr8k_layout_quoted_commas_and_grouping(tmp_path: Path) -> None:
    write_image(tmp_path / "Images" / "a.jpg")
    write_image(tmp_path / "Images" / "b.jpg")
    (tmp_path / "captions.txt").write_text(
        'image,caption\n'
        'a.jpg,"A dog, brown, runs ."\n'
        'a.jpg,A dog   runs .\n'
        'b.jpg,"He said ""hi"" , then left"\n'
    )
    spec = parse_data_spec(str(tmp_path))  # a folder with captions.txt is detected as csv
    assert spec.kind == "csv" and spec.path.endswith("captions.txt")
    rs = load_records(spec)
    assert [r.key for r in rs.records] == ["a.jpg", "b.jpg"]
    assert rs.records[0].captions == ("A dog, brown, runs .", "A dog runs .")
    assert rs.records[1].captions == ('He said "hi" , then left',)
    assert rs.records[0].image == str((tmp_path / "Images" / "a.jpg").resolve())


def test_csv_custom_columns_separator_and_errors(tmp_path: Path) -> None:
    write_image(tmp_path / "pics" / "x.png", fmt="PNG")
    f = tmp_path / "data.tsv"
    f.write_text("id\tfile\tdesc\n1\tx.png\ta red thing\n")
    rs = load_records(parse_data_spec(f"csv:{f}?image_column=file&caption_column=desc&separator=tab&images_root={tmp_path / 'pics'}"))
    assert rs.records[0].captions == ("a red thing",)
    with pytest.raises(DataError, match="no column 'nope'"):
        load_records(DataSpec(kind="csv", path=str(f), image_column="nope", images_root=str(tmp_path / "pics")))
    with pytest.raises(DataError, match="cannot find the images"):
        load_records(DataSpec(kind="csv", path=str(f), image_column="file", caption_column="desc"))
    g = tmp_path / "odd.csv"
    g.write_text("foo,bar\n1,2\n")
    with pytest.raises(DataError, match="set image_column"):
        load_records(DataSpec(kind="csv", path=str(g)))


def test_flickr30k_results_with_malformed_row(tmp_path: Path) -> None:
    for name in ("1000092795.jpg", "2199200615.jpg"):
        write_image(tmp_path / "flickr30k_images" / name)
    f = tmp_path / "results.csv"
    f.write_text(
        "image_name| comment_number| comment\n"
        '1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n'
        '1000092795.jpg| 1| Two "friends enjoy time spent together .\n'
        "2199200615.jpg| 3| A dog runs .\n"
        "2199200615.jpg| 4   A dog runs across the grass .\n"
    )
    spec = parse_data_spec(str(f))
    assert spec.kind == "flickr30k"
    rs = load_records(spec)
    assert len(rs) == 2
    assert rs.records[0].captions[1] == 'Two "friends enjoy time spent together .'
    assert rs.records[1].captions == ("A dog runs .", "A dog runs across the grass .")


# ---------------------------------------------------------------- json family
def test_json_list_with_string_and_list_captions(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "sub" / "b.jpg")
    f = tmp_path / "caps.json"
    f.write_text(json.dumps([
        {"image": "a.jpg", "caption": "one"},
        {"image": "sub/b.jpg", "caption": ["two", "three"], "label": 1},
        {"image": "a.jpg", "caption": "four"},
    ]))
    spec = parse_data_spec(str(f))
    assert spec.kind == "json"
    rs = load_records(spec)
    assert [(r.key, r.captions, r.label) for r in rs.records] == [
        ("a.jpg", ("one", "four"), None), ("sub/b.jpg", ("two", "three"), 1)
    ]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("<image>\nselect luxury furniture", "select luxury furniture"),
        ("a cat <image> on a mat", "a cat on a mat"),
        ("a dog on grass\n<image>", "a dog on grass"),
    ],
)
def test_llava_gpt_turn_with_image_token_stripped(tmp_path: Path, value: str, expected: str) -> None:
    write_image(tmp_path / "images" / "00453" / "004539375.jpg")
    f = tmp_path / "blip_laion_cc_sbu_558k.json"
    f.write_text(json.dumps([{
        "id": "004539375", "image": "00453/004539375.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
            {"from": "gpt", "value": value},
        ],
    }]))
    spec = parse_data_spec(str(f))
    assert spec.kind == "llava"
    rs = load_records(spec)
    assert rs.records[0].captions == (expected,)
    assert rs.records[0].image.endswith("images/00453/004539375.jpg")


def test_coco_captions_multi_caption(tmp_path: Path) -> None:
    write_image(tmp_path / "val2017" / "000000000139.jpg")
    write_image(tmp_path / "val2017" / "000000000285.jpg")
    (tmp_path / "annotations").mkdir()
    f = tmp_path / "annotations" / "captions_val2017.json"
    f.write_text(json.dumps({
        "info": {}, "images": [
            {"id": 139, "file_name": "000000000139.jpg"}, {"id": 285, "file_name": "000000000285.jpg"},
            {"id": 999, "file_name": "uncaptioned.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 285, "caption": "A big bear."},
            {"id": 2, "image_id": 139, "caption": "A living room."},
            {"id": 3, "image_id": 285, "caption": "A brown bear  sitting."},
            {"id": 4, "image_id": 777, "caption": "orphan"},
        ],
    }))
    spec = parse_data_spec(str(f))
    assert spec.kind == "coco"
    rs = load_records(spec)
    assert [r.key for r in rs.records] == ["000000000139.jpg", "000000000285.jpg"]
    assert rs.records[1].captions == ("A big bear.", "A brown bear sitting.")
    assert Path(rs.records[1].image).is_file()


def test_invalid_json_is_a_data_error(tmp_path: Path) -> None:
    f = tmp_path / "broken.json"
    f.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(DataSpec(kind="json", path=str(f)))


# ---------------------------------------------------------------- parquet
def test_parquet_bytes_structs_and_paths(tmp_path: Path) -> None:
    red, blue = image_bytes((255, 0, 0)), image_bytes((0, 0, 255))
    write_image(tmp_path / "g.jpg", (0, 255, 0))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": red, "path": "r.png"}, {"bytes": None, "path": "g.jpg"}, {"bytes": red, "path": None}], struct),
        "text": ["a red square", "a green square", "red again"],
    })
    pq.write_table(table, tmp_path / "train-00000.parquet")
    spec = parse_data_spec(str(tmp_path / "train-00000.parquet"))
    assert spec.kind == "parquet"
    rs = load_records(spec)
    assert len(rs) == 2  # the two red rows are the same image (content key) and merge
    assert rs.records[0].image == red and rs.records[0].captions == ("a red square", "red again")
    assert rs.records[1].image == str(tmp_path / "g.jpg")

    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"jpg": [blue], "caption": ["a blue square"]}), raw / "part.parquet")
    rs2 = load_records(parse_data_spec(str(raw)))  # a folder of parquet files
    assert rs2.records[0].image == blue and rs2.records[0].key.startswith("blake2b:")

    paths = tmp_path / "paths"
    paths.mkdir()
    pq.write_table(pa.table({"file_name": ["../g.jpg"], "caption": ["green"], "other": ["x"]}), paths / "p.parquet")
    rs3 = load_records(DataSpec(kind="parquet", path=str(paths), image_column="file_name", caption_column="caption"))
    assert Path(rs3.records[0].image).resolve() == (tmp_path / "g.jpg").resolve()
    with pytest.raises(DataError, match="no column"):
        load_records(DataSpec(kind="parquet", path=str(paths), image_column="nope"))


# ---------------------------------------------------------------- spec parsing
def test_parse_data_spec_errors_and_detection(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        parse_data_spec(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="unknown data kind"):
        parse_data_spec(f"imagefolders:{tmp_path}")
    with pytest.raises(DataError, match="apply to shapes"):
        parse_data_spec(f"csv:{tmp_path}/x.csv?img_size=32")
    with pytest.raises(DataError, match="bogus"):
        parse_data_spec(f"csv:{tmp_path}/x.csv?bogus=1")
    with pytest.raises(DataError, match="empty"):
        parse_data_spec("  ")
    with pytest.raises(DataError, match="cannot tell the format"):
        parse_data_spec(str(tmp_path))  # empty folder
    assert detect_kind(str(tmp_path / "shard-{000..003}.tar")) == ("webdataset", str(tmp_path / "shard-{000..003}.tar"))
    assert parse_data_spec("webdataset:/x/s-{0..9}.tar").kind == "webdataset"
    with pytest.raises(DataError, match="streamed"):
        load_records(parse_data_spec("webdataset:/x/s-{0..9}.tar"))
    with pytest.raises(ValidationError):
        DataSpec(kind="csv", path="x", extra_field=1)  # type: ignore[call-arg]


def test_spec_round_trips_and_folder_detection(tmp_path: Path) -> None:
    write_image(tmp_path / "flickr30k_images" / "1.jpg")
    (tmp_path / "results.csv").write_text("image_name| comment_number| comment\n1.jpg| 0| A cat .\n")
    spec = parse_data_spec(f"{tmp_path}?max_samples=5")
    assert spec.kind == "flickr30k" and spec.max_samples == 5
    assert DataSpec.model_validate(spec.model_dump()) == spec
    assert load_records(spec).records[0].captions == ("A cat .",)
    with pytest.raises(DataError, match="images_root .* is not a folder"):
        load_records(spec.model_copy(update={"images_root": str(tmp_path / "nope")}))
    with pytest.raises(DataError, match="max_samples"):
        parse_data_spec(f"{tmp_path}?max_samples=0")
