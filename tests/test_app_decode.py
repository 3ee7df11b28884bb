"""Image decoding within a memory budget (issue 16 section 1): a small upload that decodes to hundreds of MB is
refused from its header or waits its turn, measured as the peak resident memory of a real server process."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from app_helpers import assert_error
from fastapi.testclient import TestClient
from PIL import Image
from test_app_support import API_KEY, live_server, shape_image

from app.decode import DecodeGate
from app.main import create_app
from app.memory import cgroup_memory_limit, memory_limit
from app.settings import Settings
from index import ImageIndex, NewImage
from model import CLIPInference
from model.image import read_header

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MB = 1024 * 1024
SIDE = 6000  # the bomb: 6000 x 6000 16-bit grey, 72 MB decoded, ~75 KB of PNG


def deep_png_bomb(side: int = SIDE) -> bytes:
    """A real, fully decodable 16-bit greyscale PNG of side x side pixels that compresses to almost nothing."""
    pixels = np.zeros((side, side), np.uint16)
    pixels[::7] = 40_000
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def deep_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 16-bit grey pixels (a token IDAT: refused before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = deep_png_bomb()
    assert len(data) < 120_000 and read_header(data).decoded_bytes == SIDE * SIDE * 2
    return data


# ---------------------------------------------------------------------- the gate
def test_decode_gate_is_first_come_first_served_and_bounded() -> None:
    async def scenario() -> tuple[list[str], int]:
        gate = DecodeGate(100)
        order: list[str] = []
        peak = 0

        async def job(name: str, nbytes: int, hold_s: float) -> None:
            nonlocal peak
            async with gate.hold(nbytes):
                peak = max(peak, gate.in_use)
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(job("big", 80, 0.05))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(job("huge", 500, 0.01)),  # over the capacity: runs alone, not never
                asyncio.create_task(job("small", 10, 0.0))]  # fits beside "big" but never overtakes "huge"
        await asyncio.gather(first, *rest)
        assert gate.in_use == 0 and gate.waiting == 0
        return order, peak

    order, peak = asyncio.run(scenario())
    assert order == ["big", "huge", "small"]
    assert peak <= 100


def test_a_cancelled_waiter_gives_its_turn_to_the_next() -> None:
    async def scenario() -> list[str]:
        gate = DecodeGate(10)
        got: list[str] = []

        async def job(name: str, nbytes: int) -> None:
            async with gate.hold(nbytes):
                got.append(name)
                await asyncio.sleep(0.02)

        holder = asyncio.create_task(job("holder", 6))
        await asyncio.sleep(0)
        blocked = asyncio.create_task(job("cancelled", 8))
        behind = asyncio.create_task(job("behind", 4))
        await asyncio.sleep(0.005)
        blocked.cancel()  # a client that went away: "behind" fits beside the holder at once
        await asyncio.gather(holder, behind)
        assert gate.in_use == 0 and gate.waiting == 0
        return got

    assert asyncio.run(scenario()) == ["holder", "behind"]


# ---------------------------------------------------------------------- the budget's size
def test_memory_limit_reads_cgroup_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    (v2 / "svc").mkdir(parents=True)
    (v2 / "svc" / "memory.max").write_text("4294967296\n")
    (v2 / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup2"
    proc.write_text("0::/svc\n")
    assert cgroup_memory_limit(proc, v2) == 4 * 1024**3
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(str(2 * 1024**3))
    proc1 = tmp_path / "cgroup1"
    proc1.write_text("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    assert cgroup_memory_limit(proc1, v1) == 2 * 1024**3
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(str(1 << 63))  # v1's "no limit"
    assert cgroup_memory_limit(proc1, v1) is None
    assert cgroup_memory_limit(tmp_path / "absent", v2) is None
    assert 0 < memory_limit() <= 1 << 50


def test_the_decode_budget_is_sized_from_the_memory_limit(tiny_checkpoint: Path) -> None:
    s = Settings(checkpoint=tiny_checkpoint, memory_limit_bytes=4 * 1024**3)
    assert (s.decode_memory, s.decode_limit) == (1024**3, 256 * MB)
    s = Settings(checkpoint=tiny_checkpoint, memory_limit_bytes=4 * 1024**3, decode_memory_bytes=100 * MB)
    assert (s.decode_memory, s.decode_limit) == (100 * MB, 25 * MB)
    s = Settings(checkpoint=tiny_checkpoint, max_decode_bytes=8 * MB)
    assert s.decode_limit == 8 * MB and s.public_limits()["max_decode_bytes"] == 8 * MB


# ---------------------------------------------------------------------- refusals, in process
@pytest.fixture(scope="module")
def small_budget(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    """A service whose largest decode is 8 MB, over an index holding a stored 16-bit bomb (by its embedding)."""
    clip = CLIPInference.load(tiny_checkpoint)
    directory = tmp_path_factory.mktemp("decode") / "idx"
    idx = ImageIndex.create(directory, clip)
    (directory / "big.png").write_bytes(deep_png_header(4000, 4000))  # 32 MB decoded
    (directory / "ok.png").write_bytes(shape_image(size=48))
    vectors = np.eye(2, clip.dim, dtype=np.float32)
    idx.add_embeddings(vectors, [NewImage("big.png", "0" * 64, 4000, 4000), NewImage("ok.png", "1" * 64, 48, 48)])
    idx.close()
    settings = Settings(checkpoint=tiny_checkpoint, index=directory, api_keys=[API_KEY], max_decode_bytes=8 * MB)
    with TestClient(create_app(settings)) as c:
        yield c


def test_an_image_that_decodes_past_the_limit_is_a_413_on_every_route(small_budget: TestClient) -> None:
    bomb = ("bomb.png", deep_png_header(3000, 3000))  # 18 MB of 16-bit pixels in 100 bytes
    err = assert_error(small_budget.post("/classify", files={"image": bomb}), 413, "image_too_large")
    assert "18,000,000 bytes" in err["message"] and "8,388,608" in err["message"]
    assert_error(small_budget.post("/similarity", files={"image": bomb}, data={"texts": ["a"]}), 413, "image_too_large")
    assert_error(small_budget.post("/search/image", files={"image": bomb}), 413, "image_too_large")
    r = small_budget.post("/embed/image", files=[("images", bomb), ("images", ("ok.png", shape_image()))])
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert first["error"]["code"] == "image_too_large" and second["embedding"] and second.get("error") is None
    # the same 8-bit RGB size fits: the price is the decoded bytes, not the pixel count alone
    rgb = io.BytesIO()
    Image.new("RGB", (1500, 1500), "red").save(rgb, format="PNG")
    assert small_budget.post("/classify", files={"image": ("rgb.png", rgb.getvalue())}).status_code == 200


def test_post_images_refuses_the_oversized_upload_and_adds_the_rest(small_budget: TestClient) -> None:
    files = [("images", ("bomb.png", deep_png_header(3000, 3000))), ("images", ("fine.png", shape_image("square")))]
    r = small_budget.post("/images", files=files, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [a["filename"] for a in body["added"]] == ["fine.png"]
    assert [(f["filename"], f["error"]["code"]) for f in body["failed"]] == [("bomb.png", "image_too_large")]


def test_thumbnails_of_stored_images_are_priced_too(small_budget: TestClient) -> None:
    ids = {r["path"]: r["id"] for r in small_budget.get("/search", params={"q": "a", "k": 10}).json()["results"]}
    assert_error(small_budget.get(f"/images/{ids['big.png']}", params={"size": 64}), 413, "image_too_large")
    ok = small_budget.get(f"/images/{ids['ok.png']}", params={"size": 32})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    assert small_budget.get(f"/images/{ids['big.png']}").status_code == 200  # the file as stored is not decoded


# ---------------------------------------------------------------------- peak memory of a real server
def _vm_hwm_mb(pid: int) -> float:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


@pytest.fixture(scope="module")
def bomb_index(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, bomb: bytes) -> Path:
    """An index holding the 16-bit bomb as a stored file, added by its embedding so building it decodes nothing."""
    clip = CLIPInference.load(tiny_checkpoint)
    directory = tmp_path_factory.mktemp("bomb") / "idx"
    idx = ImageIndex.create(directory, clip)
    (directory / "bomb.png").write_bytes(bomb)
    idx.add_embeddings(np.eye(1, clip.dim, dtype=np.float32), [NewImage("bomb.png", "0" * 64, SIDE, SIDE)])
    idx.close()
    return directory


# Room for two decodes of the bomb at once (each priced at ~241 MB); the largest single decode 100 MB.
LIVE_ENV = {"CLIPFORGE_API_KEYS": API_KEY, "CLIPFORGE_DECODE_MEMORY_BYTES": str(500 * MB),
            "CLIPFORGE_MAX_DECODE_BYTES": str(100 * MB)}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_eight_concurrent_bombs_stay_within_the_decode_budget(tiny_checkpoint: Path, bomb_index: Path,
                                                              bomb: bytes, tmp_path: Path) -> None:
    args = ["--checkpoint", str(tiny_checkpoint), "--index", str(bomb_index), "--threads", "2"]
    with live_server(LIVE_ENV, args, tmp_path / "serve.log") as server, \
            httpx.Client(base_url=server.url, timeout=120) as c:
        image = {"image": ("a.png", shape_image())}
        assert c.post("/classify", files=image, data={"labels": ["circle", "square"]}).status_code == 200
        assert c.get("/images/1", params={"size": 32}).status_code in (200, 413)  # warm the thumbnail path
        base = _vm_hwm_mb(server.proc.pid)

        # prompt-heavy classification: refused from the sizes, never tokenised
        heavy = {"labels": [f"{i}" + "\U0001F600" * 990 for i in range(200)],
                 "templates": [f"a photo {i} of a {{}}" for i in range(8)]}
        assert_error(c.post("/classify", files=image, data=heavy), 422, "prompt_too_long")
        assert_error(c.post("/classify", files=image, data={"labels": ["x" * 1000], "templates": ["{}" * 499]}),
                     422, "prompt_too_long")
        prompts = _vm_hwm_mb(server.proc.pid) - base

        # eight bombs over the 100 MB limit (9000 x 9000 x 2 bytes): 413 from the header, nothing allocated
        refused_bomb = deep_png_header(9000, 9000)
        with ThreadPoolExecutor(8) as pool:
            refused = list(pool.map(lambda _: c.post("/embed/image", files={"images": ("b.png", refused_bomb)}),
                                    range(8)))
        assert all(r.status_code == 200 and r.json()["results"][0]["error"]["code"] == "image_too_large"
                   for r in refused), [r.text[:200] for r in refused]
        after_refusals = _vm_hwm_mb(server.proc.pid) - base

        # eight real bombs at once, within the limit: four uploads and four thumbnails of the stored one
        def send(i: int) -> httpx.Response:
            if i % 2:
                return c.get("/images/1", params={"size": 64})
            return c.post("/embed/image", files={"images": (f"b{i}.png", bomb)})

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, range(8)))
        elapsed = time.monotonic() - started
        assert [r.status_code for r in answers] == [200] * 8, [r.text[:200] for r in answers]
        assert all(r.json()["results"][0].get("error") is None for r in answers[::2])
        grown = _vm_hwm_mb(server.proc.pid) - base
    assert prompts < 60, f"prompt-heavy classify grew the peak by {prompts:.0f} MB"
    assert after_refusals < 60, f"refused bombs grew the peak by {after_refusals:.0f} MB"
    # two decodes of ~215 MB at a time; unbounded, eight of them took the peak past 1,700 MB
    assert grown < 700, f"eight concurrent bombs grew the peak by {grown:.0f} MB"
    assert elapsed < 60, elapsed
