"""`clipforge demo`: from a fresh clone to a running service in one command.

Generates the synthetic shapes data set, trains a small CLIP on it on the CPU, builds the
index of the generated images and serves them, printing the web page URL and example curl
commands. Each artefact is reused on the next run (unless --retrain), so a second
`clipforge demo` starts serving in seconds.

Training and indexing run as child processes (`clipforge train`, `clipforge index build`),
so the app package never imports training: data still flows one way, training -> checkpoint
-> index -> app. Their progress bars go straight to the terminal.

Layout of --workdir (the same inside the Docker image, where the workdir is /var/lib/clipforge):
    images/shapes/        the generated data set (train/val/heldout/seen splits)
    checkpoints/demo/     the training run; best/ is the checkpoint that is served
    index/demo/           the index of the val and held-out images
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from model.errors import ClipforgeError

DEFAULT_WORKDIR = Path(".cache/demo")
# The shapes recipe of bench/quality_bench.py; why each choice: docs/benchmarks.md, "The demo's recipe".
PRESET = "shapes-64"
N_TRAIN = 6000
N_VAL = 300
EPOCHS = 3
BATCH_SIZE = 64
DEFAULT_MINUTES = 6.0  # a cap for a busy machine: training then stops early, still with a usable model
READY_TIMEOUT_S = 300.0


class DemoError(ClipforgeError):
    """A step of the demo failed; the message says which and what to do."""


@dataclass(frozen=True)
class DemoLayout:
    """Where the demo keeps each artefact under its working directory."""

    workdir: Path

    @property
    def shapes(self) -> Path:
        return self.workdir / "images" / "shapes"

    @property
    def run(self) -> Path:
        return self.workdir / "checkpoints" / "demo"

    @property
    def checkpoint(self) -> Path:
        return self.run / "best"

    @property
    def index(self) -> Path:
        return self.workdir / "index" / "demo"


def _clipforge(*args: str) -> list[str]:
    """The same `clipforge` this process is, whatever the PATH says."""
    return [sys.executable, "-m", "clipforge_cli", *args]


def train_command(layout: DemoLayout, minutes: float, max_steps: int | None) -> list[str]:
    """`clipforge train` on the shapes data, zero-shot accuracy on the held-out combinations picking the best."""
    shapes = layout.shapes.resolve()
    cmd = _clipforge(
        "train", "--preset", PRESET,
        "--data", f"shapes:{shapes}?split=train&n_train={N_TRAIN}&n_val={N_VAL}&img_size=64",
        "--val-data", f"shapes:{shapes}?split=val",
        "--zeroshot-data", f"shapes:{shapes}?split=heldout",
        "--out", str(layout.run.resolve()),
        "--epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE), "--lr", "2e-3", "--warmup-steps", "30",
        "--weight-decay", "0.05", "--text-lr-scale", "0.1", "--no-train-augment", "--max-minutes", f"{minutes:g}",
        "--device", "cpu", "--num-workers", "1", "--no-tensorboard",
    )
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    return cmd


def index_commands(layout: DemoLayout) -> list[list[str]]:
    """Build from the captioned val split, then add the held-out combinations (never seen in training)."""
    shapes = layout.shapes.resolve()
    return [
        _clipforge("index", "build", "--checkpoint", str(layout.checkpoint.resolve()),
                   "--data", f"shapes:{shapes}?split=val", "--root", str(shapes), "--out", str(layout.index.resolve())),
        _clipforge("index", "add", str(layout.index.resolve()), str(shapes / "images" / "heldout")),
    ]


def _run(cmd: list[str], what: str) -> None:
    """Run a child clipforge command with the terminal as its output; a failure becomes a DemoError."""
    print(f"$ clipforge {' '.join(cmd[3:])}", flush=True)
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise DemoError(f"{what} failed (exit {result.returncode}); see its output above")


def _checkpoint_ready(layout: DemoLayout) -> bool:
    return (layout.checkpoint / "meta.json").is_file()


def ensure_model(layout: DemoLayout, retrain: bool, minutes: float, max_steps: int | None) -> Path:
    """The trained demo checkpoint: reused when present, else trained (an interrupted run starts over)."""
    if _checkpoint_ready(layout) and not retrain:
        print(f"reusing the trained demo model in {layout.checkpoint} (--retrain trains a new one)", flush=True)
        return layout.checkpoint
    # The demo's own folders: an old model, or a run cut short (images uploaded to the index are kept).
    if layout.run.exists():
        shutil.rmtree(layout.run)
    _remove_index(layout)
    budget = f"{max_steps} steps" if max_steps is not None else f"about {minutes:g} minutes"
    print(f"training the demo model ({PRESET}) on synthetic shapes on the CPU: {budget}", flush=True)
    _run(train_command(layout, minutes, max_steps), "training")
    if not _checkpoint_ready(layout):
        raise DemoError(f"training finished without writing {layout.checkpoint}; rerun with --retrain")
    return layout.checkpoint


def _remove_index(layout: DemoLayout) -> None:
    """Delete the demo index, first moving the images uploaded to it (INDEX/uploads) aside: stored data stays."""
    if not layout.index.exists():
        return
    uploads = layout.index / "uploads"
    if uploads.is_dir() and any(uploads.iterdir()):
        kept = layout.workdir / "uploads-kept" / time.strftime("%Y%m%d-%H%M%S")
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(uploads), str(kept))
        print(f"kept the images uploaded to the old index in {kept} "
              f"(add them back with `clipforge index add {layout.index} {kept} --copy`)", flush=True)
    shutil.rmtree(layout.index)


def _index_matches(layout: DemoLayout) -> bool:
    """True when the index exists, opens, and was built by the checkpoint being served."""
    if not layout.index.exists():
        return False
    from index.image_index import ImageIndex
    from model import content_hash

    try:
        idx = ImageIndex.open(layout.index, model_id=content_hash(layout.checkpoint))
    except ClipforgeError as exc:
        print(f"rebuilding the index: {exc}", flush=True)
        return False
    return len(idx) > 0


def ensure_index(layout: DemoLayout) -> Path:
    """The index of the demo images: reused when it matches the checkpoint (keeping uploads), else built."""
    if _index_matches(layout):
        print(f"reusing the index in {layout.index}", flush=True)
        return layout.index
    _remove_index(layout)
    print("indexing the generated images", flush=True)
    build, add = index_commands(layout)
    _run(build, "building the index")
    _run(add, "adding the held-out images to the index")
    return layout.index


def banner(layout: DemoLayout, base_url: str) -> str:
    """The URL of the web page and curl commands that work against this demo."""
    sample = layout.shapes / "images" / "heldout" / "000000.png"
    return "\n".join([
        "",
        f"clipforge demo is ready: open {base_url}/ in a browser",
        "",
        "Try it from a shell:",
        f"  curl -F image=@{sample} {base_url}/classify",
        f"  curl -F image=@{sample} -F labels='red circle' -F labels='blue square' -F labels='green triangle' {base_url}/classify",
        f"  curl '{base_url}/search?q=a+red+circle&k=5'",
        f"  curl {base_url}/info",
        "",
        "Press Ctrl-C to stop.",
        "",
    ])


def _wait_ready(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DemoError(f"the service exited (code {server.returncode}) before it was ready; see its output above")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise DemoError(f"the service was not ready after {timeout_s:.0f} s")


def serve(layout: DemoLayout, host: str, port: int) -> int:
    """Run `clipforge serve` on the demo artefacts until Ctrl-C or SIGTERM; print the banner once it is ready.

    The service runs in its own session, so one Ctrl-C reaches it exactly once (forwarded from
    here) and it can drain in-flight requests instead of being forced down.
    """
    cmd = _clipforge("serve", "--checkpoint", str(layout.checkpoint.resolve()), "--index", str(layout.index.resolve()),
                     "--host", host, "--port", str(port))
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    print(f"starting the service on {host}:{port}", flush=True)
    server = subprocess.Popen(cmd, start_new_session=True)

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        _wait_ready(url, server, READY_TIMEOUT_S)
        print(banner(layout, url), flush=True)
        code = server.wait()
        if code != 0:
            raise DemoError(f"the service stopped with exit code {code}; see its output above")
        return 0
    except KeyboardInterrupt:
        print("stopping the service", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.poll() is None:
            server.send_signal(signal.SIGINT)  # uvicorn drains in-flight requests on the first SIGINT
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def cmd_demo(args: argparse.Namespace) -> int:
    if args.minutes <= 0:
        raise DemoError("--minutes must be positive")
    if args.max_steps is not None and args.max_steps <= 0:
        raise DemoError("--max-steps must be positive")
    if not 1 <= args.port <= 65535:
        raise DemoError(f"--port must be between 1 and 65535, got {args.port}")
    layout = DemoLayout(Path(args.workdir))
    try:
        layout.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoError(f"cannot create the demo folder {layout.workdir}: {exc.strerror or exc}") from None
    if not os.access(layout.workdir, os.W_OK):
        raise DemoError(f"cannot write to the demo folder {layout.workdir}")
    ensure_model(layout, args.retrain, args.minutes, args.max_steps)
    ensure_index(layout)
    if args.no_serve:
        print(f"demo model: {layout.checkpoint}\ndemo index: {layout.index}", flush=True)
        return 0
    return serve(layout, args.host, args.port)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="train a small CLIP on synthetic shapes, index it and serve it (one command)",
        description="Generate the synthetic shapes data set, train a small CLIP on it on the CPU, index the "
                    "images and start the service. Artefacts in --workdir are reused on the next run.",
    )
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help=f"folder for data, model and index (default {DEFAULT_WORKDIR})")
    parser.add_argument("--retrain", action="store_true", help="train a new model (and index) even if one exists")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help=f"training time budget (default {DEFAULT_MINUTES:g})")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training after this many steps (quick checks)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to serve on (default 8000)")
    parser.add_argument("--no-serve", action="store_true", help="prepare the model and index, then exit")
    parser.set_defaults(func=cmd_demo)
