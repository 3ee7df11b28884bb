"""The service on a Milvus collection, against real engines: in this process over Milvus Lite (a `.milvus`
location file as CLIPFORGE_INDEX), and two real `clipforge serve` replicas sharing one collection on a
milvus-lite server process (the same pymilvus client code that talks to a Milvus cluster)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from test_app_api import assert_error
from test_app_support import API_KEY, COLORS, ROOT, free_port, live_server, shape_image

import clipforge_cli
from app.main import create_app
from app.settings import Settings
from model import CLIPInference

pytest.importorskip("pymilvus", reason="the Milvus store needs pymilvus: pip install 'clipforge[milvus]'")
pytest.importorskip("milvus_lite", reason="these tests run Milvus Lite: pip install 'clipforge[milvus]'")

from index.milvus import MilvusImageIndex

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SHAPES = ("circle", "square", "triangle")


def _photos(folder: Path) -> Path:
    """12 shape images (4 colours x 3 shapes) with a captions file for `index build --data csv:`."""
    folder.mkdir(parents=True)
    for color in COLORS:
        for shape in SHAPES:
            (folder / f"{color}_{shape}.png").write_bytes(shape_image(shape, color, size=48))
    return folder


def _location_file(path: Path, location: str) -> Path:
    path.write_text(f"# the shared image index\n{location}\n")
    return path


def _stop(proc: subprocess.Popen) -> None:
    """milvus-lite's clean shutdown (drain, close the data folder) on SIGINT; a kill if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def milvus_lite_server(data_dir: Path, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """milvus-lite's gRPC server in its own process on a free loopback port: (milvus://127.0.0.1:PORT, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
           "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.skip(f"milvus-lite's server does not start here: {log_path.read_text(errors='replace')[-300:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                pytest.skip("milvus-lite's server did not listen within 60 s")
            time.sleep(0.2)
        yield f"milvus://127.0.0.1:{port}", proc
    finally:
        _stop(proc)


# ---------------------------------------------------------------------- in this process, over Milvus Lite
@pytest.fixture(scope="module")
def clip(tiny_checkpoint: Path) -> CLIPInference:
    return CLIPInference.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def lite_index(tmp_path_factory: pytest.TempPathFactory, clip: CLIPInference) -> Path:
    """A `.milvus` file naming a Milvus Lite collection of the 12 photos, whose files are then deleted."""
    base = tmp_path_factory.mktemp("milvus-app")
    photos = _photos(base / "photos")
    location = f"milvus-lite:{base / 'data.db'}/photos"
    with MilvusImageIndex.create(location, clip, root=photos) as idx:
        paths = sorted(photos.glob("*.png"))
        report = idx.add_files(clip, paths, [f"a {p.stem.replace('_', ' ')}" for p in paths], workers=0)
        assert len(report.added) == 12, report
    shutil.rmtree(photos)  # every image is served from the collection's stored bytes
    return _location_file(base / "photos.milvus", location)


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path, lite_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    os.environ["CLIPFORGE_MILVUS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    settings = Settings(checkpoint=tiny_checkpoint, index=lite_index, api_keys=[API_KEY], max_k=20)
    try:
        with TestClient(create_app(settings)) as test_client:
            yield test_client
    finally:
        os.environ.pop("CLIPFORGE_MILVUS_CACHE", None)


def test_search_get_add_delete_on_a_milvus_location(client: TestClient) -> None:
    assert client.get("/readyz").json()["index"] is True
    info = client.get("/info").json()["index"]
    assert info["size"] == 12 and info["type"] == "hnsw" and info["dim"] == 128
    hits = client.get("/search", params={"q": "a red circle", "k": 12}).json()["results"]
    assert len(hits) == 12 and all(hits[i]["score"] >= hits[i + 1]["score"] for i in range(11))
    assert {h["path"] for h in hits} == {f"{c}_{s}.png" for c in COLORS for s in SHAPES}
    cut = client.get("/search", params={"q": "a red circle", "k": 12, "min_score": hits[3]["score"]}).json()["results"]
    assert [h["id"] for h in cut] == [h["id"] for h in hits[:4]]
    red = client.get("/search", params={"q": "a red circle", "k": 12, "path_prefix": "red_"}).json()["results"]
    assert [h["path"] for h in red] == [h["path"] for h in hits if h["path"].startswith("red_")] and len(red) == 3
    squares = client.post("/search/image", files={"image": ("q.png", shape_image("square", "blue", size=48))},
                          data={"k": "12", "caption_contains": "square", "min_width": "48"}).json()["results"]
    assert sorted(h["path"] for h in squares) == sorted(f"{c}_square.png" for c in COLORS)
    blue = shape_image("square", "blue", size=48)
    same = client.post("/search/image", files={"image": ("q.png", blue)}, data={"k": "1"}).json()["results"][0]
    assert same["path"] == "blue_square.png" and same["score"] > 0.999
    assert client.get(same["url"]).content == blue  # the files are gone: these bytes come from Milvus
    thumb = client.get(same["url"], params={"size": 16})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"

    new = shape_image("triangle", "yellow", size=40, fmt="JPEG")
    files = [("images", ("new.jpg", new)), ("images", ("dup.png", blue)), ("images", ("bad.png", b"\x89PNG\r\n\x1a\nno"))]
    assert_error(client.post("/images", files=files), 401)
    body = client.post("/images", files=files, data={"captions": ["a new one", "dup", "bad"]}, headers=AUTH).json()
    assert body["size"] == 13 and [d["id"] for d in body["duplicates"]] == [same["id"]]
    assert [f["filename"] for f in body["failed"]] == ["bad.png"]
    new_id = body["added"][0]["id"]
    found = client.get("/search", params={"q": "a new one", "k": 13}).json()["results"]
    mine = next(h for h in found if h["id"] == new_id)
    assert mine["caption"] == "a new one" and mine["path"].startswith("uploads/")
    assert client.get(mine["url"]).content == new
    assert client.delete(f"/images/{new_id}", headers=AUTH).json() == {"deleted": 1, "size": 12}
    assert_error(client.get(f"/images/{new_id}"), 404)
    assert_error(client.delete(f"/images/{new_id}", headers=AUTH), 404)
    assert_error(client.get("/images/12345"), 404)


def test_another_checkpoints_collection_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from index import IndexMismatchError

    location = f"milvus-lite:{tmp_path / 'other.db'}/other"
    MilvusImageIndex.create(location, "0" * 64, dim=128).close()
    app = create_app(Settings(checkpoint=tiny_checkpoint, index=_location_file(tmp_path / "other.milvus", location)))
    with pytest.raises(IndexMismatchError, match="built with checkpoint 000000000000") as err, TestClient(app):
        pass
    assert "\n" not in str(err.value)


def test_start_up_on_an_unreachable_server_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pointer = _location_file(tmp_path / "down.milvus", f"milvus://127.0.0.1:{free_port()}/photos")
    run = subprocess.run([sys.executable, "-m", "clipforge_cli", "serve", "--checkpoint", str(tiny_checkpoint),
                          "--index", str(pointer), "--port", str(free_port())],
                         check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "connecting failed" in run.stderr and "server unavailable" in run.stderr
    bad = _location_file(tmp_path / "bad.milvus", "milvus://no-port/photos")
    run = subprocess.run([sys.executable, "-m", "clipforge_cli", "serve", "--checkpoint", str(tiny_checkpoint),
                          "--index", str(bad)], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2 and "is not HOST:PORT" in run.stderr and "Traceback" not in run.stderr


# ---------------------------------------------------------------------- two replicas on one server
def test_two_replicas_share_one_collection_and_hold_no_copy(tiny_checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    with milvus_lite_server(tmp_path / "server.db", tmp_path / "milvus.log") as (server, milvus):
        photos = _photos(tmp_path / "photos")
        location = f"{server}/shared"
        code = clipforge_cli.main(["index", "build", "--checkpoint", str(tiny_checkpoint), "--images", str(photos),
                                   "--out", location, "--quiet", "--workers", "0"])
        assert code == 0 and "12 image(s)" in capsys.readouterr().out
        shutil.rmtree(photos)  # no shared disk: the replicas serve images from Milvus only
        pointer = _location_file(tmp_path / "shared.milvus", location)
        # replica a reads a location file, replica b the milvus:// location itself (serve --index / CLIPFORGE_INDEX)
        args_a = ["--checkpoint", str(tiny_checkpoint), "--index", str(pointer), "--max-wait-ms", "2"]
        args_b = ["--checkpoint", str(tiny_checkpoint), "--index", location, "--max-wait-ms", "2"]

        def env(name: str) -> dict[str, str]:  # no reload loop: nothing but the shared collection explains a change
            return {"CLIPFORGE_API_KEYS": API_KEY, "CLIPFORGE_INDEX_RELOAD_S": "0",
                    "CLIPFORGE_MILVUS_CACHE": str(tmp_path / f"cache-{name}")}

        with live_server(env("a"), args_a, tmp_path / "a.log") as a, live_server(env("b"), args_b, tmp_path / "b.log") as b:
            def search(live, q: str, k: int = 13) -> list[dict]:
                r = httpx.get(live.url + "/search", params={"q": q, "k": k}, timeout=30)
                assert r.status_code == 200, r.text
                return r.json()["results"]

            search_ids = [h["id"] for h in search(a, "a red circle")]
            assert search_ids == [h["id"] for h in search(b, "a red circle")]
            new = shape_image("circle", "green", size=40, fmt="JPEG")
            added = httpx.post(a.url + "/images", files=[("images", ("new.jpg", new))], data={"captions": ["fresh"]},
                               headers=AUTH, timeout=60).json()
            new_id = added["added"][0]["id"]
            assert added["size"] == 13
            hit = next(h for h in search(b, "fresh") if h["id"] == new_id)  # at once, through the other replica
            assert hit["caption"] == "fresh"
            assert httpx.get(b.url + hit["url"], timeout=30).content == new
            again = httpx.post(b.url + "/images", files=[("images", ("copy.jpg", new))], headers=AUTH, timeout=60).json()
            assert again["added"] == [] and [d["id"] for d in again["duplicates"]] == [new_id]
            assert httpx.get(b.url + "/info", timeout=30).json()["index"]["size"] == 13

            gone = httpx.delete(f"{b.url}/images/{new_id}", headers=AUTH, timeout=30).json()
            assert gone == {"deleted": 1, "size": 12}
            assert all(h["id"] != new_id for h in search(a, "fresh"))
            assert httpx.get(f"{a.url}/images/{new_id}", timeout=30).status_code == 404
            assert httpx.get(a.url + "/info", timeout=30).json()["index"]["size"] == 12
            assert not list((tmp_path / "cache-a").glob("*"))  # replica a never served an image: it cached none

            _stop(milvus)
            for live in (a, b):  # neither replica can answer from a copy of its own
                r = httpx.get(live.url + "/search", params={"q": "a red circle"}, timeout=60)
                assert r.status_code == 503 and r.json()["error"]["code"] == "index_unavailable", r.text
                assert r.headers["Retry-After"] == "5"
            for r in (httpx.get(f"{a.url}/images/{search_ids[0]}", timeout=60),  # not in a's cache: Milvus is asked
                      httpx.post(b.url + "/images", files=[("images", ("late.jpg", new))], headers=AUTH, timeout=60)):
                assert r.status_code == 503 and r.json()["error"]["code"] == "index_unavailable", r.text
            for log in (a.log, b.log):
                assert "Traceback" not in log.read_text()



def test_a_milvus_location_setting_is_checked_when_read(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import SettingsError, load_settings

    ok = load_settings(checkpoint=tiny_checkpoint, index="milvus://127.0.0.1:19530/photos")  # no connection yet
    assert str(ok.index).startswith("milvus:/")
    monkeypatch.setenv("CLIPFORGE_INDEX", "milvus://milvus:19530/shared_photos")
    assert "shared_photos" in str(load_settings(checkpoint=tiny_checkpoint).index)
    for bad, why in (("milvus://127.0.0.1/photos", "is not HOST:PORT"), ("milvus://127.0.0.1:19530", "give the collection"),
                     ("milvus-lite:data/photos", "PATH.db/COLLECTION"), ("/nowhere/index", "does not exist")):
        with pytest.raises(SettingsError, match=why) as caught:
            load_settings(checkpoint=tiny_checkpoint, index=bad)
        assert "\n" not in str(caught.value).strip() and "Traceback" not in str(caught.value)
