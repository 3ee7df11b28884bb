"""`clipforge index build|add|remove|info|search|rebuild` end to end, in-process and through the real entry point."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipforge_cli
from index import ImageIndex

ROOT = Path(__file__).resolve().parents[1]


def png(seed: int, size: int = 36) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = clipforge_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def photo_dir(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i in range(5):
        (root / f"p{i}.png").write_bytes(png(i))
    (root / "a" / "deep.png").write_bytes(png(10))
    Image.open(io.BytesIO(png(11))).save(root / "a" / "b" / "deeper.jpg", format="JPEG")
    Image.open(io.BytesIO(png(12))).save(root / "a" / "pic.webp", format="WEBP")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    (root / "dup.png").write_bytes(png(0))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden" / "h.png").write_bytes(png(20))
    return root


def test_build_info_search_add_remove(tmp_path: Path, tiny_checkpoint: Path, photo_dir: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "index"
    code, out, err = run(capsys, "index", "build", "--checkpoint", str(tiny_checkpoint), "--images", str(photo_dir),
                         "--out", str(out_dir), "--quiet", "--workers", "0")
    assert code == 0, err
    assert "added 8 image(s)" in out and "1 duplicate(s)" in out and "1 skipped" in out and "images/s" in out
    assert "broken.jpg" in err  # skipped files are listed at the end
    code, out, _ = run(capsys, "index", "info", str(out_dir), "--json", "--verify")
    info = json.loads(out)
    assert info["count"] == 8 and info["verified"]["count"] == 8 and info["index_type"] == "flat"
    assert info["checkpoint_path"] == str(tiny_checkpoint.resolve())
    code, out, _ = run(capsys, "index", "info", str(out_dir))
    assert code == 0 and "8 image(s), flat index" in out
    code, out, _ = run(capsys, "index", "search", str(out_dir), "--image", str(photo_dir / "a" / "deep.png"), "-k", "3", "--json")
    hits = json.loads(out)
    assert code == 0 and hits[0]["path"] == "a/deep.png" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    code, out, _ = run(capsys, "index", "search", str(out_dir), "a red circle", "-k", "2")
    assert code == 0 and out.count("id ") == 2
    new = photo_dir / "new.png"
    new.write_bytes(png(30))
    code, out, _ = run(capsys, "index", "add", str(out_dir), str(new), str(photo_dir / "p1.png"))
    assert code == 0 and "added 1 image(s)" in out and "1 duplicate(s)" in out
    code, out, _ = run(capsys, "index", "remove", str(out_dir), "1", "a/deep.png")
    assert code == 0 and "removed 2 image(s)" in out
    code, out, _ = run(capsys, "index", "remove", str(out_dir), "nothing.png")
    assert code == 1 and "removed 0" in out
    code, out, _ = run(capsys, "index", "rebuild", str(out_dir), "--type", "hnsw", "--ef-search", "64")
    assert code == 0 and "flat -> hnsw" in out
    idx = ImageIndex.open(out_dir)
    assert len(idx) == 7 and idx.index_type == "hnsw" and idx.info()["params"]["ef_search"] == 64
    idx.verify()
    # building again over an existing index is refused with a pointer to `index add`
    code, _, err = run(capsys, "index", "build", "--checkpoint", str(tiny_checkpoint), "--images", str(photo_dir),
                       "--out", str(out_dir))
    assert code == 2 and "index add" in err


def test_cli_errors_are_one_line(tmp_path: Path, tiny_checkpoint: Path, photo_dir: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "index", "info", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("clipforge: error:") and "Traceback" not in err
    ImageIndex.create(tmp_path / "other", "0" * 64, dim=128, root=photo_dir).close()
    code, _, err = run(capsys, "index", "add", str(tmp_path / "other"), str(photo_dir / "p0.png"),
                       "--checkpoint", str(tiny_checkpoint))
    assert code == 2 and "built with checkpoint" in err
    code, _, err = run(capsys, "index", "search", str(tmp_path / "other"), "x")
    assert code == 2 and "--checkpoint" in err  # no recorded checkpoint path
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "index", "build", "--checkpoint", str(tiny_checkpoint), "--images", str(empty),
                       "--out", str(tmp_path / "x"))
    assert code == 2 and "no image files" in err


def test_entry_point_subprocess(tmp_path: Path, tiny_checkpoint: Path, photo_dir: Path) -> None:
    exe = Path(sys.executable).parent / "clipforge"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys, clipforge_cli; sys.exit(clipforge_cli.main())"]
    out_dir = tmp_path / "index"
    proc = subprocess.run(cmd + ["index", "build", "--checkpoint", str(tiny_checkpoint), "--images", str(photo_dir / "a"),
                                 "--out", str(out_dir), "--type", "hnsw", "--workers", "1", "--batch-size", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "added 3 image(s)" in proc.stdout and "img/s" in proc.stderr  # the progress bar reports images/s
    assert ImageIndex.open(out_dir).verify()["count"] == 3


def test_build_from_a_data_spec_keeps_captions(tmp_path: Path, tiny_checkpoint: Path, photo_dir: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    csv = photo_dir / "captions.csv"
    csv.write_text("image,caption\np0.png,a first picture\np0.png,another caption\np1.png,a second picture\n"
                   "p2.png,a third picture\n")
    code, _, err = run(capsys, "index", "build", "--checkpoint", str(tiny_checkpoint), "--data", f"csv:{csv}",
                         "--out", str(tmp_path / "index"), "--quiet")
    assert code == 0, err
    idx = ImageIndex.open(tmp_path / "index")
    assert sorted((r.path, r.caption) for r in idx.records()) == [
        ("p0.png", "a first picture"), ("p1.png", "a second picture"), ("p2.png", "a third picture")
    ]
    assert idx.resolve_path(idx.records()[0].id).parent == photo_dir.resolve()


def test_build_on_real_images(tmp_path: Path, tiny_checkpoint: Path, shared_data: Path,
                              capsys: pytest.CaptureFixture) -> None:
    images = shared_data / "flickr8k-1k" / "images"
    if not images.is_dir():
        pytest.skip("flickr8k-1k images not present")
    spec = f"csv:{shared_data / 'flickr8k-1k' / 'captions.txt'}?max_samples=24"
    code, _, err = run(capsys, "index", "build", "--checkpoint", str(tiny_checkpoint), "--data", spec,
                         "--out", str(tmp_path / "index"), "--quiet")
    assert code == 0, err
    idx = ImageIndex.open(tmp_path / "index")
    assert len(idx) == 24 and all(r.caption for r in idx.records())
    for r in idx.records()[:5]:
        assert Image.open(idx.resolve_path(r.id)).size == (r.width, r.height)
