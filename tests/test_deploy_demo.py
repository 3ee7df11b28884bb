"""`clipforge demo`: argument errors, reuse of a trained model, index (re)building, serving and stopping.

The path from nothing (generate, train, index) runs inside the container in `make
compose-smoke`, whose bootstrap service is `clipforge demo --no-serve`. Here a real
checkpoint and a small generated shapes folder stand in for the trained artefacts, so the
rest of the command runs for real in seconds: the index is built by `clipforge index
build`, the service is a real `clipforge serve`, and deploy/smoke_client.py calls it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("CLIPFORGE_")}, "PYTHONUNBUFFERED": "1"}



def _clipforge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge_cli", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A demo folder with a small generated shapes set and a real checkpoint where training puts best/."""
    from training.data.shapes import generate_shapes

    work = tmp_path_factory.mktemp("demo")
    generate_shapes(work / "images" / "shapes", n_train=6, n_val=8, n_eval=6, img_size=32)
    shutil.copytree(tiny_checkpoint, work / "checkpoints" / "demo" / "best")
    return work


def _index_size_and_model(path: Path) -> tuple[int, str]:
    from index.image_index import ImageIndex

    idx = ImageIndex.open(path)
    return len(idx), idx.manifest.model_id


def test_help_lists_the_options() -> None:
    result = _clipforge("demo", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--workdir", "--retrain", "--port", "--no-serve", "--minutes", "--max-steps", "--host"):
        assert flag in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--max-steps", "0"], "--max-steps must be positive"),
    (["--minutes", "-1"], "--minutes must be positive"),
    (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
])
def test_bad_arguments_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = _clipforge("demo", "--workdir", str(tmp_path / "w"), "--no-serve", *args, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"clipforge: error: {message}"
    assert not (tmp_path / "w").exists(), "nothing is created for a refused command"


def test_unwritable_workdir_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = _clipforge("demo", "--workdir", str(blocker / "demo"), "--no-serve", timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and result.stderr.startswith("clipforge: error:")


def test_reuses_the_model_and_builds_then_reuses_the_index(workdir: Path) -> None:
    first = _clipforge("demo", "--workdir", str(workdir), "--no-serve")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "reusing the trained demo model" in first.stdout
    assert "clipforge train" not in first.stdout, "a trained model must not be retrained"
    assert "$ clipforge index build" in first.stdout and "$ clipforge index add" in first.stdout
    from model import content_hash

    size, model_id = _index_size_and_model(workdir / "index" / "demo")
    assert size == 8 + 6, "the val split (captioned) plus the held-out images"
    assert model_id == content_hash(workdir / "checkpoints" / "demo" / "best")

    second = _clipforge("demo", "--workdir", str(workdir), "--no-serve")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reusing the index" in second.stdout and "index build" not in second.stdout


def test_serves_until_sigterm_and_answers_like_the_deployment(workdir: Path, smoke_client: Any) -> None:
    port = _free_port()
    # `clipforge demo --port 8080 --host 0.0.0.0`, as the README shows it: the banner still names a loopback URL
    demo = subprocess.Popen([sys.executable, "-m", "clipforge_cli", "demo", "--workdir", str(workdir), "--port", str(port),
                             "--host", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=ENV)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        assert demo.stdout is not None
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C to stop." in line:
                break
        banner = "".join(lines)
        assert f"open http://127.0.0.1:{port}/ in a browser" in banner, banner
        assert f"curl 'http://127.0.0.1:{port}/search?q=a+red+circle&k=5'" in banner
        sample = workdir / "images" / "shapes" / "images" / "heldout" / "000000.png"
        assert f"curl -F image=@{sample} http://127.0.0.1:{port}/classify" in banner
        assert sample.is_file(), "the curl example names a file that exists"

        failed = smoke_client.run_checks(f"http://127.0.0.1:{port}", api_key=None, expect_images=True)
        assert failed == 0

        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    with socket.socket() as s:  # the service the demo started is gone with it
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_an_index_of_another_checkpoint_is_rebuilt(workdir: Path, tmp_path: Path) -> None:
    from model import CLIP, content_hash, load_checkpoint, save_checkpoint

    best = workdir / "checkpoints" / "demo" / "best"
    model, tokenizer, meta = load_checkpoint(best, "cpu")
    torch.manual_seed(1)
    other = CLIP(model.cfg)
    staged = tmp_path / "best"
    save_checkpoint(staged, other, tokenizer, {k: v for k, v in meta.items() if k in ("step", "class_names")})
    shutil.rmtree(best)
    shutil.copytree(staged, best)

    result = _clipforge("demo", "--workdir", str(workdir), "--no-serve")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rebuilding the index" in result.stdout
    size, model_id = _index_size_and_model(workdir / "index" / "demo")
    assert size == 14 and model_id == content_hash(best)


def test_retrain_trains_a_new_model_and_rebuilds_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """`clipforge demo --retrain`: the whole path from nothing (generate, train, index), then a second
    --retrain trains again and rebuilds the index. The data set is shrunk so it runs in seconds."""
    import json

    import clipforge_cli
    from app import demo as demo_mod
    from model import content_hash

    monkeypatch.setattr(demo_mod, "N_TRAIN", 160)  # two batches of 64
    monkeypatch.setattr(demo_mod, "N_VAL", 12)
    work = tmp_path / "demo"
    run = work / "checkpoints" / "demo"
    args = ["demo", "--workdir", str(work), "--no-serve"]
    assert clipforge_cli.main([*args, "--max-steps", "2"]) == 0
    assert json.loads((run / "last" / "meta.json").read_text())["step"] == 2
    capfd.readouterr()

    assert clipforge_cli.main([*args, "--max-steps", "2"]) == 0
    assert "reusing the trained demo model" in capfd.readouterr().out

    assert clipforge_cli.main([*args, "--retrain", "--max-steps", "3"]) == 0
    out = capfd.readouterr().out
    assert "training the demo model" in out and "$ clipforge index build" in out
    assert json.loads((run / "last" / "meta.json").read_text())["step"] == 3, "--retrain must train again"
    size, model_id = _index_size_and_model(work / "index" / "demo")
    assert model_id == content_hash(run / "best"), "the index belongs to the new model"
    heldout = len(list((work / "images" / "shapes" / "images" / "heldout").iterdir()))
    assert size == demo_mod.N_VAL + heldout


def test_rebuilding_the_demo_index_keeps_the_images_uploaded_to_it(tmp_path: Path, capsys) -> None:
    from app.demo import DemoLayout, _remove_index

    layout = DemoLayout(tmp_path)
    (layout.index / "uploads").mkdir(parents=True)
    (layout.index / "uploads" / "mine.png").write_bytes(b"the user's photo")
    (layout.index / "CURRENT").write_text("gen-00000001")
    _remove_index(layout)
    assert not layout.index.exists()
    kept = list((tmp_path / "uploads-kept").glob("*/mine.png"))
    assert [p.read_bytes() for p in kept] == [b"the user's photo"]
    assert "kept the images uploaded" in capsys.readouterr().out
    _remove_index(layout)  # nothing there: nothing to do
