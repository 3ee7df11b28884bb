"""The service's ONNX path (CLIPFORGE_ONNX / serve --onnx): onnxruntime runs the forward passes of the
checkpoint's own export and every endpoint answers as the torch path does; a foreign export is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from test_app_support import ROOT, free_port, shape_image

from app.limits import ServingLimits
from app.main import create_app
from app.settings import Settings, SettingsError, load_settings
from interop.onnx_export import CONFIG, export_onnx

TEXTS = ["a red circle", "a big blue square next to a green triangle", "green", "a triangle"]
IMAGES = [shape_image(shape, colour, size=40) for shape, colour in
          (("circle", "red"), ("square", "blue"), ("triangle", "green"))]


@pytest.fixture(scope="module")
def export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def clients(tiny_checkpoint: Path, export: Path) -> Iterator[tuple[TestClient, TestClient]]:
    torch_app = create_app(Settings(checkpoint=tiny_checkpoint, text_cache_size=0), ServingLimits())
    onnx_app = create_app(Settings(checkpoint=tiny_checkpoint, onnx=export, text_cache_size=0), ServingLimits())
    with TestClient(torch_app) as a, TestClient(onnx_app) as b:
        yield a, b


def _cosines(a: list[list[float]], b: list[list[float]]) -> np.ndarray:
    x, y = np.asarray(a), np.asarray(b)
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


def test_info_names_the_runtime(clients: tuple[TestClient, TestClient]) -> None:
    torch_c, onnx_c = clients
    assert torch_c.get("/info").json()["runtime"] == "torch"
    info = onnx_c.get("/info").json()
    assert info["runtime"] == "onnxruntime" and info["model"] == torch_c.get("/info").json()["model"]


def test_embeddings_equal_the_torch_path(clients: tuple[TestClient, TestClient]) -> None:
    torch_c, onnx_c = clients
    a = torch_c.post("/embed/text", json={"texts": TEXTS}).json()["embeddings"]
    b = onnx_c.post("/embed/text", json={"texts": TEXTS}).json()["embeddings"]
    assert _cosines(a, b).min() >= 0.9999
    assert _cosines(a, b[1:] + b[:1]).max() < 0.999  # different texts are told apart: the check can fail
    files = [("images", (f"{i}.png", data)) for i, data in enumerate(IMAGES)]
    a = [r["embedding"] for r in torch_c.post("/embed/image", files=files).json()["results"]]
    b = [r["embedding"] for r in onnx_c.post("/embed/image", files=files).json()["results"]]
    assert len(b) == len(IMAGES) and _cosines(a, b).min() >= 0.9999


def test_similarity_and_classify_equal_the_torch_path(clients: tuple[TestClient, TestClient]) -> None:
    torch_c, onnx_c = clients
    body = {"files": {"image": ("a.png", IMAGES[0])}, "data": {"texts": TEXTS}}
    a = torch_c.post("/similarity", **body).json()["results"]
    b = onnx_c.post("/similarity", **body).json()["results"]
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert max(abs(x["probability"] - y["probability"]) for x, y in zip(a, b)) < 2e-3
    body = {"files": {"image": ("a.png", IMAGES[1])}, "data": {"labels": ["circle", "square", "triangle"]}}
    a = torch_c.post("/classify", **body).json()
    b = onnx_c.post("/classify", **body).json()
    assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]


def test_an_export_of_another_checkpoint_is_refused_in_one_line(tiny_checkpoint: Path, export: Path,
                                                               tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    shutil.copytree(export, foreign)
    config = json.loads((foreign / CONFIG).read_text())
    config["content_hash"] = "f" * 64
    (foreign / CONFIG).write_text(json.dumps(config))
    run = subprocess.run([sys.executable, "-m", "clipforge_cli", "serve", "--checkpoint", str(tiny_checkpoint),
                          "--onnx", str(foreign), "--port", str(free_port())],
                         check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "is of checkpoint ffffffffffff" in run.stderr and "clipforge model export" in run.stderr
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(checkpoint=tiny_checkpoint, onnx=tmp_path / "missing")
