"""`clipforge index --device` reads `auto` as every other command does (model.device.resolve_device)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge_cli
from index import ImageIndex


def test_index_build_and_search_accept_device_auto(tmp_path: Path, tiny_checkpoint: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    out = tmp_path / "index"
    code = clipforge_cli.main(["index", "build", "--checkpoint", str(tiny_checkpoint), "--images", str(photos),
                               "--out", str(out), "--quiet", "--workers", "0", "--device", "auto"])
    assert code == 0, capsys.readouterr().err
    assert len(ImageIndex.open(out)) == 3
    capsys.readouterr()
    assert clipforge_cli.main(["index", "search", str(out), "a red circle", "-k", "2", "--device", "auto"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_index_search_on_a_missing_gpu_is_a_one_line_error(tmp_path: Path, tiny_checkpoint: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "index"
    photos = tmp_path / "photos"
    photos.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="PNG")
    (photos / "red.png").write_bytes(buf.getvalue())
    assert clipforge_cli.main(["index", "build", "--checkpoint", str(tiny_checkpoint), "--images", str(photos),
                               "--out", str(out), "--quiet", "--workers", "0"]) == 0
    capsys.readouterr()
    assert clipforge_cli.main(["index", "search", str(out), "red", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err
