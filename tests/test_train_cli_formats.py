"""`clipforge train` through the CLI on every data format the README shows, each on a tiny file
written here in that format's real layout: one step, then a checkpoint that loads."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_train_support import (
    COLORS,
    SHAPES,
    SMALL,
    draw,
    write_caption_data,
    write_imagefolder,
)

import clipforge_cli
from model import CLIPInference

N = 12


def _pairs(seed: int = 0) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for _ in range(N):
        c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
        buf = io.BytesIO()
        draw(c, s, rng).save(buf, format="PNG")
        out.append((f"a {c} {s}", buf.getvalue()))
    return out


def _files(root: Path) -> list[tuple[str, str]]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (caption, data) in enumerate(_pairs()):
        (root / "images" / f"{i}.png").write_bytes(data)
        rows.append((f"{i}.png", caption))
    return rows


def _flickr30k(root: Path) -> str:
    rows = _files(root)
    lines = ["image_name| comment_number| comment"] + [f"{n}| 0| {c}" for n, c in rows]
    (root / "images" / "results.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"flickr30k:{root / 'images' / 'results.csv'}"


def _json(root: Path) -> str:
    rows = _files(root)
    (root / "pairs.json").write_text(json.dumps([{"image": f"images/{n}", "caption": c} for n, c in rows]))
    return f"json:{root / 'pairs.json'}"


def _llava(root: Path) -> str:
    rows = _files(root)
    items = [{"id": str(i), "image": f"images/{n}", "conversations": [
        {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
        {"from": "gpt", "value": c}]} for i, (n, c) in enumerate(rows)]
    (root / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(items))
    return f"llava:{root / 'blip_laion_cc_sbu_558k.json'}"


def _coco(root: Path) -> str:
    rows = _files(root)
    (root / "annotations").mkdir()
    doc = {"images": [{"id": i, "file_name": n} for i, (n, _) in enumerate(rows)],
           "annotations": [{"id": i, "image_id": i, "caption": c} for i, (_, c) in enumerate(rows)]}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(doc))
    # COCO keeps images in a folder named after the split, beside annotations/
    (root / "images").rename(root / "train2017")
    return f"coco:{root / 'annotations' / 'captions_train2017.json'}"


def _parquet(root: Path) -> str:
    root.mkdir(parents=True)
    pairs = _pairs()
    pq.write_table(pa.table({"image": [{"bytes": d, "path": None} for _, d in pairs], "text": [c for c, _ in pairs]}),
                   root / "captions.parquet")
    return f"parquet:{root / 'captions.parquet'}"


def _webdataset(root: Path) -> str:
    root.mkdir(parents=True)
    pairs = _pairs()
    for s in range(2):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for i, (caption, data) in enumerate(pairs[s::2]):
                for name, payload in ((f"{s}_{i:04d}.png", data), (f"{s}_{i:04d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return f"webdataset:{root}/shard-{{000000..000001}}.tar"


WRITERS = {
    "csv": lambda root: f"csv:{write_caption_data(root, n=N)}",
    "imagefolder": lambda root: f"imagefolder:{write_imagefolder(root, per_class=2)}",
    "flickr30k": _flickr30k, "json": _json, "llava": _llava, "coco": _coco, "parquet": _parquet,
    "webdataset": _webdataset,
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_train_command_on_each_format(kind: str, tmp_path: Path) -> None:
    spec = WRITERS[kind](tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--preset", "mini-32", "--data", spec, "--out", str(out), "--max-samples", "8",
            "--max-steps", "1", "--batch-size", "4", "--val-fraction", "0", "--num-workers", "0", "--threads", "1",
            "--no-progress", "--no-tensorboard", "--no-plots"]
    for key, value in SMALL.items():
        args += ["--set", f"{key}={value}"]
    assert clipforge_cli.main(args) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["data"] == spec and saved["max_samples"] == 8
    clip = CLIPInference.load(out / "last")
    assert clip.embed_texts(["a red circle"]).shape == (1, SMALL["align_dim"])


def test_streamed_shards_by_epochs_through_the_cli(tmp_path: Path) -> None:
    """The README's webdataset line: --samples-per-epoch instead of --max-steps gives whole epochs."""
    spec = _webdataset(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--preset", "mini-32", "--data", spec, "--out", str(out), "--samples-per-epoch", "8",
            "--epochs", "2", "--batch-size", "4", "--val-fraction", "0", "--num-workers", "0", "--threads", "1",
            "--log-every", "1", "--no-progress", "--no-tensorboard", "--no-plots"]
    for key, value in SMALL.items():
        args += ["--set", f"{key}={value}"]
    assert clipforge_cli.main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


def test_config_file_with_a_flag_overriding_it(tmp_path: Path) -> None:
    """`clipforge train --config train.toml --lr 3e-4`, as the README shows it."""
    data = write_caption_data(tmp_path / "data", n=N)
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in SMALL.items())
    (tmp_path / "train.toml").write_text(
        f'preset = "mini-32"\ndata = "csv:{data}"\nout = "{tmp_path / "run"}"\nlr = 1e-3\nmax_steps = 1\n'
        f"batch_size = 4\nval_fraction = 0.0\nnum_workers = 0\nthreads = 1\nprogress = false\ntensorboard = false\n"
        f"plots = false\n\n[model]\n{model}\n",
        encoding="utf-8",
    )
    assert clipforge_cli.main(["train", "--config", str(tmp_path / "train.toml"), "--lr", "3e-4"]) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["lr"] == 3e-4 and saved["batch_size"] == 4 and saved["model"]["img_dim"] == SMALL["img_dim"]


def test_eval_command_on_a_caption_csv_writes_the_report_into_meta(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """`clipforge eval --checkpoint CKPT --data csv:captions.txt`: recall both ways, into meta.json."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    data = write_caption_data(tmp_path / "data", n=N)
    assert "i2t_r1" not in (ckpt / "meta.json").read_text()
    assert clipforge_cli.main(["eval", "--checkpoint", str(ckpt), "--data", f"csv:{data}"]) == 0
    meta = json.loads((ckpt / "meta.json").read_text())
    report = json.dumps(meta)
    assert "i2t_r1" in report and "t2i_r10" in report
