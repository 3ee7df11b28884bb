"""Shared helpers for the app tests (images, bad inputs, a small index, a live uvicorn); holds no tests."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789"
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 220, 40)}


def shape_image(shape: str = "circle", color: str = "red", size: int = 64, fmt: str = "PNG") -> bytes:
    """A coloured shape on white, encoded as bytes."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    box = (size // 6, size // 6, size * 5 // 6, size * 5 // 6)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, size // 6), (size * 5 // 6, size * 5 // 6), (size // 6, size * 5 // 6)], fill=fill)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (the body is a token IDAT, never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    data = shape_image("square", "blue", size=128, fmt="JPEG")
    return data[: len(data) // 2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Live:
    url: str
    log: Path
    proc: subprocess.Popen


@contextlib.contextmanager
def live_server(env: dict[str, str], args: list[str], log_path: Path, timeout: float = 90.0) -> Iterator[Live]:
    """`clipforge serve` in a subprocess on a free loopback port (127.0.0.1 only), ready when yielded."""
    port = free_port()
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **env}
    cmd = [sys.executable, "-m", "clipforge_cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {timeout}s:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.2)
        yield Live(base, log_path, proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
