"""`clipforge index build` under torchrun (2 gloo processes on CPU) makes the index a single process makes."""

from __future__ import annotations

import io
import json
import socket
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchrun_helpers import run_torchrun

import clipforge_cli
from index import ImageIndex, IndexStoreError
from index.backends import vectors_and_ids
from index.files import iter_image_files

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20 + seed % 7, 24 + seed % 5, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _photos(root: Path) -> Path:
    """40 files: 37 distinct images, two byte-identical copies dealt to different ranks, a third one a round
    later, and a corrupt file."""
    (root / "sub").mkdir(parents=True)
    for i in range(30):
        (root / f"im{i:02d}.png").write_bytes(png(i))
    for i in range(30, 37):
        (root / "sub" / f"s{i}.png").write_bytes(png(i))
    (root / "im05dup.png").write_bytes(png(5))  # sorts right after im05.png: the other rank
    (root / "sub" / "s99.png").write_bytes(png(5))  # the last file: the second round, again a repeat
    (root / "im12bad.png").write_bytes(b"\x89PNG not really")
    files = [p.relative_to(root).as_posix() for p in iter_image_files(root)]
    assert len(files) == 40
    first, copy = files.index("im05.png"), files.index("im05dup.png")
    assert first % WORLD != copy % WORLD  # round-robin puts the two copies on different ranks
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(argv: list[str], log: Path, timeout: float = 120) -> tuple[int, str]:
    """`torchrun --nproc_per_node 2 -m clipforge_cli ARGV` on CPU, killed whole on a hang."""
    launcher = ["--nproc_per_node", str(WORLD), "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return run_torchrun(launcher, ["clipforge_cli", *argv], log, timeout=timeout, env={"CUDA_VISIBLE_DEVICES": ""})


def _contents(path: Path) -> tuple[list[tuple], np.ndarray, np.ndarray, dict]:
    idx = ImageIndex.open(path)
    try:
        records = [(r.id, r.path, r.caption, r.width, r.height, r.sha256) for r in idx.records(0, 1000)]
        vectors, ids = vectors_and_ids(idx._state.index, idx.index_type)
        order = np.argsort(ids)
        manifest = json.loads(idx.manifest.to_json())
    finally:
        idx.close()
    for moment in ("created", "updated"):
        manifest.pop(moment)
    return records, ids[order], vectors[order], manifest


def test_two_ranks_build_the_single_process_index(tmp_path: Path, tiny_checkpoint: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    photos = _photos(tmp_path / "photos")
    common = ["--checkpoint", str(tiny_checkpoint), "--images", str(photos), "--quiet", "--workers", "0",
              "--batch-size", "2"]  # rounds of 8 batches per rank: 32 inputs, so 40 take two rounds
    assert clipforge_cli.main(["index", "build", *common, "--out", str(tmp_path / "single")]) == 0
    single_out, single_err = capsys.readouterr()

    code, log = _torchrun(["index", "build", *common, "--out", str(tmp_path / "dist")], tmp_path / "torchrun.log")
    assert code == 0, log[-3000:]

    records, ids, vectors, manifest = _contents(tmp_path / "single")
    d_records, d_ids, d_vectors, d_manifest = _contents(tmp_path / "dist")
    assert len(records) == 37  # 40 files - 2 repeats - 1 corrupt
    assert d_records == records  # same ids, paths, sizes, hashes, in the same order
    assert d_ids.tolist() == ids.tolist() == [r[0] for r in records]
    np.testing.assert_allclose(d_vectors, vectors, atol=1e-5)
    assert d_manifest == manifest  # count, next id, generation, type, root, checkpoint: all but the times
    assert "im05dup.png" not in {r[1] for r in d_records} and "sub/s99.png" not in {r[1] for r in d_records}

    summary = "added 37 image(s)"
    assert summary in single_out and "2 duplicate(s), 1 skipped" in single_out
    assert log.count(summary) == 1 and "2 duplicate(s), 1 skipped" in log  # rank 0 reports, once
    assert single_err.count("im12bad.png") == 1 and log.count("im12bad.png") == 1


def test_milvus_out_is_refused_in_one_line() -> None:
    from index.distributed_build import _check_out

    with pytest.raises(IndexStoreError, match="cannot be built under torchrun") as caught:
        _check_out(Namespace(out="milvus://localhost:19530/photos"))
    assert "\n" not in str(caught.value)
