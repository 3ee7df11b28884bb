"""Small real data sets written by the training tests, and the helpers they share.

(Imported by the other test_train_* files; its own tests check the data it writes.)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

COLORS = {"red": (220, 30, 30), "blue": (30, 70, 225), "green": (30, 165, 50), "yellow": (240, 215, 25)}
SHAPES = ("circle", "square")


def draw(color: str, shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(im)
    x, y, r = rng.randint(10, size - 10), rng.randint(10, size - 10), rng.randint(5, 9)
    (d.ellipse if shape == "circle" else d.rectangle)([x - r, y - r, x + r, y + r], fill=COLORS[color])
    return im


def write_caption_data(root: Path, n: int = 48, n_corrupt: int = 0, seed: int = 0) -> Path:
    """root/images/*.png + root/captions.txt (two captions per image, one quoted with a comma)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = ["image,caption"]
    for i in range(n):
        c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
        name = f"img{i:03d}.png"
        if i < n_corrupt:
            (root / "images" / name).write_bytes(b"\x89PNG not really an image")
        else:
            draw(c, s, rng).save(root / "images" / name)
        rows.append(f'{name},"a {c} {s}, small"')
        rows.append(f"{name},the {s} is {c}")
    (root / "captions.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "captions.txt"


def write_imagefolder(root: Path, per_class: int = 6, seed: int = 1) -> Path:
    """root/<color shape>/*.png: a labelled set for zero-shot evaluation."""
    rng = random.Random(seed)
    for c in COLORS:
        for s in SHAPES:
            folder = root / f"{c}_{s}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw(c, s, rng).save(folder / f"{i}.png")
    return root


# mini-32 shrunk further so that a test step takes milliseconds on a busy 2-core machine.
SMALL = {"img_dim": 64, "img_n_heads": 2, "text_dim": 64, "text_n_heads": 2, "text_n_kv_heads": 1, "align_dim": 64,
         "img_n_layers": 1, "text_n_layers": 1, "patch_size": 8, "vocab_size": 512}


def base_config(source: Path, out: Path, **kw: Any) -> dict[str, Any]:
    """A mini-32 run small enough for a test: few steps, no workers, no bar, no TensorBoard.

    One thread: on a 2-core machine shared with other jobs, two OpenMP threads can be 10x slower.
    """
    cfg = {
        "preset": "mini-32", "model": dict(SMALL), "data": f"csv:{source}",
        "out": str(out), "batch_size": 8, "epochs": 1, "lr": 1e-3, "warmup_steps": 2, "num_workers": 0,
        "progress": False, "tensorboard": False, "plots": False, "val_fraction": 0.2, "seed": 0, "threads": 1,
    }
    cfg.update(kw)
    return cfg


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), f"{k} differs by {(wa[k] - wb[k]).abs().max()}"


def test_caption_data_is_loadable(tmp_path: Path) -> None:
    from training.data import load_records, parse_data_spec

    path = write_caption_data(tmp_path, n=10, n_corrupt=2)
    rs = load_records(parse_data_spec(f"csv:{path}"))
    assert len(rs.records) == 10
    assert all(len(r.captions) == 2 for r in rs.records)
    assert all("," in r.captions[0] for r in rs.records)  # the quoted comma survived


def write_shards(root: Path, n_shards: int = 2, per_shard: int = 12) -> str:
    """Webdataset tar shards of shape images with "a {colour} {shape}" captions; returns the data spec."""
    import io
    import tarfile

    rng = random.Random(3)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                c, sh = rng.choice(list(COLORS)), rng.choice(SHAPES)
                buf = io.BytesIO()
                draw(c, sh, rng).save(buf, format="PNG")
                for name, payload in ((f"{s}_{i:04d}.png", buf.getvalue()), (f"{s}_{i:04d}.txt", f"a {c} {sh}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return f"webdataset:{root}/shard-{{000..{n_shards - 1:03d}}}.tar"
