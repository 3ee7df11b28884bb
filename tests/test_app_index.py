"""The index-backed endpoints through TestClient: search, search by image, images (get, add, delete)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_app_api import assert_error
from test_app_support import API_KEY, COLORS, png_bomb, shape_image

from app.main import create_app
from app.settings import Settings
from model import CLIPInference

SHAPES = ("circle", "square", "triangle")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def build_index(directory: Path, clip: CLIPInference) -> Path:
    """A 12-image index (4 colours x 3 shapes) with captions, files inside the index folder."""
    from index import ImageIndex

    idx = ImageIndex.create(directory, clip)
    images = directory / "images"
    images.mkdir()
    paths, captions = [], []
    for color in COLORS:
        for shape in SHAPES:
            path = images / f"{color}_{shape}.png"
            path.write_bytes(shape_image(shape, color, size=48))
            paths.append(path)
            captions.append(f"a {color} {shape}")
    report = idx.add_files(clip, paths, captions)
    assert len(report.added) == len(paths), report
    idx.close()
    return directory


@pytest.fixture(scope="module")
def clip(tiny_checkpoint: Path) -> CLIPInference:
    return CLIPInference.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, clip: CLIPInference) -> Path:
    return build_index(tmp_path_factory.mktemp("index") / "idx", clip)


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path, index_dir: Path) -> TestClient:
    settings = Settings(checkpoint=tiny_checkpoint, index=index_dir, api_keys=[API_KEY], max_k=20)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture()
def writable(tiny_checkpoint: Path, index_dir: Path, tmp_path: Path) -> TestClient:
    """A client over a private copy of the index, for tests that write."""
    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, index=copy, api_keys=[API_KEY]))) as c:
        yield c


def test_ready_and_info_with_index(client: TestClient) -> None:
    assert client.get("/readyz").json() == {"status": "ready", "model": True, "index": True}
    info = client.get("/info").json()
    assert info["index"]["size"] == 12 and info["index"]["type"] == "flat" and info["index"]["dim"] == 128
    assert "root" not in info["index"] and "path" not in info["index"]
    assert "clipforge_index_size 12.0" in client.get("/metrics").text


def test_search_matches_the_index(client: TestClient, clip: CLIPInference, index_dir: Path) -> None:
    from index import ImageIndex

    r = client.get("/search", params={"q": "a red circle", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "a red circle" and body["model"] == clip.model_id
    results = body["results"]
    assert len(results) == 5
    scores = [hit["score"] for hit in results]
    assert scores == sorted(scores, reverse=True)
    with ImageIndex.open(index_dir) as idx:
        expected = idx.search_by_vector(clip.embed_texts(["a red circle"]), 5)[0]
    assert [hit["id"] for hit in results] == [e.id for e in expected]
    first = results[0]
    assert first["url"] == f"/images/{first['id']}"
    assert first["path"].startswith("images/") and first["caption"].startswith("a ")
    assert first["width"] == 48 and first["height"] == 48


def test_search_min_score_and_k(client: TestClient) -> None:
    everything = client.get("/search", params={"q": "a blue square", "k": 20}).json()["results"]
    assert len(everything) == 12
    cut = sorted(hit["score"] for hit in everything)[6]
    kept = client.get("/search", params={"q": "a blue square", "k": 20, "min_score": cut}).json()["results"]
    assert kept and all(hit["score"] >= cut for hit in kept) and len(kept) < 12


def test_one_batched_search_keeps_each_querys_own_min_score_and_k(clip: CLIPInference, index_dir: Path) -> None:
    """Queries with different cuts share one index call; each answer is what the index gives that query alone."""
    import asyncio

    from app.index_search import IndexSearcher
    from app.model_worker import ModelWorker
    from index import ImageIndex

    vectors = clip.embed_texts(["a red circle", "a blue square", "a green triangle"])
    with ImageIndex.open(index_dir) as idx:
        scores = [hit.score for hit in idx.search_by_vector(vectors[1:2], 12)[0]]
        # a cut between the 6th and 7th scores: a batch is scored by another kernel (BLAS) than one query,
        # which may round a score by an ulp, so a cut equal to a score could keep it in one and not the other
        cut = (scores[5] + scores[6]) / 2
        assert scores[5] - scores[6] > 1e-4
        queries = [(vectors[0], 3, None), (vectors[1], 12, cut), (vectors[2], 12, None), (vectors[0], 2, -1.0)]
        expected = [idx.search_by_vector(v[None], k, cut)[0] for v, k, cut in queries]
        calls: list[int] = []
        search = idx.search_by_vector

        def counted(*args, **kwargs):
            calls.append(len(args[0]))
            return search(*args, **kwargs)

        idx.search_by_vector = counted  # type: ignore[method-assign]

        async def main() -> list:
            worker = ModelWorker(max_batch_size=8, max_wait_ms=1000, in_flight=lambda: len(queries))
            searcher = IndexSearcher(idx, worker)
            worker.start()
            try:
                return await asyncio.gather(*(searcher.search(v, k, cut) for v, k, cut in queries))
            finally:
                await worker.stop()

        got = asyncio.run(main())
    assert calls == [len(queries)]  # one index call for the whole batch
    assert [[h.id for h in hits] for hits in got] == [[h.id for h in hits] for hits in expected]
    assert len(got[1]) == 6 and all(h.score >= cut for h in got[1])  # the cut really dropped the rest
    assert [len(hits) for hits in got] == [3, 6, 12, 2]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"q": "x", "k": 0}, "invalid_k"),
        ({"q": "x", "k": -1}, "invalid_k"),
        ({"q": "x", "k": 21}, "invalid_k"),
        ({"q": "x", "k": "ten"}, "validation_error"),
        ({"k": 3}, "validation_error"),
        ({"q": "x" * 60_000}, "text_too_long"),  # 1 MB queries: see the end-to-end corpus
        ({"q": "nul\x00inside"}, "invalid_text"),
        ({"q": ""}, "invalid_text"),
        ({"q": "x", "min_score": 2}, "validation_error"),
    ],
)
def test_search_bad_parameters(client: TestClient, params: dict, code: str) -> None:
    assert_error(client.get("/search", params=params), 422, code)


def test_search_invalid_utf8_query(client: TestClient) -> None:
    assert_error(client.get("/search?q=caf%C3%28%FF&k=3"), 422, "invalid_text")


def test_search_by_image_finds_itself(client: TestClient, index_dir: Path) -> None:
    data = (index_dir / "images" / "green_triangle.png").read_bytes()
    r = client.post("/search/image", files={"image": ("q.png", data)}, data={"k": "3"})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["path"] == "images/green_triangle.png" and top["score"] == pytest.approx(1.0, abs=1e-4)
    assert_error(client.post("/search/image", files={"image": ("q.png", data)}, data={"k": "0"}), 422, "invalid_k")
    assert_error(client.post("/search/image", files={"image": ("b.png", png_bomb())}), 413, "image_too_large")
    assert_error(client.post("/search/image", files={"image": ("b.jpg", b"text, not jpeg")}), 415)


def test_get_image_and_thumbnail(client: TestClient, index_dir: Path) -> None:
    hit = client.get("/search", params={"q": "a yellow square", "k": 1}).json()["results"][0]
    original = client.get(hit["url"])
    assert original.status_code == 200 and original.headers["content-type"] == "image/png"
    assert original.content == (index_dir / hit["path"]).read_bytes()
    thumb = client.get(hit["url"], params={"size": 16})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 16
    assert_error(client.get(hit["url"], params={"size": 5000}), 422, "invalid_size")
    assert_error(client.get(hit["url"], params={"size": 2}), 422)
    assert_error(client.get("/images/999"), 404, "not_found")
    assert_error(client.get("/images/-1"), 422)
    assert_error(client.get(f"/images/{10**30}"), 422)
    assert client.get("/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    assert client.get("/images/../../etc/passwd").status_code == 404


def _current_db(index: Path) -> Path:
    return index / (index / "CURRENT").read_text().strip() / "meta.sqlite"


def test_stored_paths_outside_the_root_are_never_served(tiny_checkpoint: Path, index_dir: Path, tmp_path: Path) -> None:
    """A record whose path leaves the root (edited metadata, or its file swapped for a symlink out) is a 404."""
    import sqlite3

    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    secret = tmp_path / "outside.png"
    secret.write_bytes(shape_image("square", "red", size=20))
    with sqlite3.connect(_current_db(copy)) as db:
        (edited, _), (linked, linked_path) = db.execute("SELECT id, path FROM images ORDER BY id LIMIT 2").fetchall()
        db.execute("UPDATE images SET path = '../outside.png' WHERE id = ?", (edited,))
    (copy / linked_path).unlink()
    (copy / linked_path).symlink_to(secret)
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, index=copy))) as c:
        for image_id in (edited, linked):
            for params in ({}, {"size": 16}):
                r = c.get(f"/images/{image_id}", params=params)
                assert_error(r, 404, "not_found")
                assert r.content != secret.read_bytes()


def test_thumbnail_of_a_bad_stored_file_is_a_documented_error(tiny_checkpoint: Path, index_dir: Path,
                                                              tmp_path: Path) -> None:
    """413 (stored image over the serve-time pixel limit) and 415 (no longer an image), as GET /images/{id} documents."""
    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    (copy / "images" / "blue_square.png").write_bytes(b"no longer an image")
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, index=copy, max_pixels=2000))) as c:
        by_path = {h["path"]: h["url"] for h in c.get("/search", params={"q": "x", "k": 12}).json()["results"]}
        assert_error(c.get(by_path["images/red_circle.png"], params={"size": 16}), 413, "image_too_large")  # 48x48
        assert_error(c.get(by_path["images/blue_square.png"], params={"size": 16}), 415, "unsupported_image")
        documented = c.get("/openapi.json").json()["paths"]["/images/{id}"]["get"]["responses"]
        assert {"413", "415"} <= set(documented)


def test_add_search_get_and_delete(writable: TestClient, clip: CLIPInference) -> None:
    new = shape_image("circle", "yellow", size=40, fmt="JPEG")
    existing = shape_image("circle", "red", size=48)  # the same bytes as images/red_circle.png
    files = [("images", ("../../evil name.jpg", new)), ("images", ("dup.png", existing)),
             ("images", ("broken.png", b"\x89PNG\r\n\x1a\nnot really"))]
    assert_error(writable.post("/images", files=files), 401)
    r = writable.post("/images", files=files, data={"captions": ["a new yellow circle", "dup", "broken"]}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == 13
    assert [a["filename"] for a in body["added"]] == ["../../evil name.jpg"]
    assert [d["filename"] for d in body["duplicates"]] == ["dup.png"]
    assert [f["filename"] for f in body["failed"]] == ["broken.png"]
    new_id = body["added"][0]["id"]
    hits = writable.get("/search", params={"q": "a new yellow circle", "k": 13}).json()["results"]
    mine = next(h for h in hits if h["id"] == new_id)
    assert mine["caption"] == "a new yellow circle"
    assert ".." not in mine["path"] and mine["path"].startswith("uploads/")
    assert writable.get(mine["url"]).content == new
    assert_error(writable.delete(f"/images/{new_id}"), 401)
    deleted = writable.delete(f"/images/{new_id}", headers=AUTH)
    assert deleted.json() == {"deleted": 1, "size": 12}
    assert_error(writable.get(f"/images/{new_id}"), 404)
    assert_error(writable.delete(f"/images/{new_id}", headers=AUTH), 404)
    assert all(h["id"] != new_id for h in writable.get("/search", params={"q": "a yellow circle", "k": 20}).json()["results"])


def test_add_images_limits(writable: TestClient) -> None:
    one = [("images", ("a.png", shape_image()))]
    r = writable.post("/images", files=one, data={"captions": ["a", "b"]}, headers=AUTH)
    assert_error(r, 422, "captions_mismatch")
    many = [("images", (f"{i}.png", shape_image())) for i in range(33)]
    assert_error(writable.post("/images", files=many, headers=AUTH), 422, "too_many_images")


def test_index_from_another_checkpoint_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from index import ImageIndex, IndexMismatchError

    other = tmp_path / "other"
    ImageIndex.create(other, "0" * 64, dim=128).close()
    app = create_app(Settings(checkpoint=tiny_checkpoint, index=other))
    with pytest.raises(IndexMismatchError, match="built with checkpoint"), TestClient(app):
        pass


def test_embeddings_of_search_hits_are_consistent(client: TestClient, clip: CLIPInference, index_dir: Path) -> None:
    data = (index_dir / "images" / "blue_circle.png").read_bytes()
    emb = client.post("/embed/image", files=[("images", ("b.png", data))]).json()["results"][0]["embedding"]
    np.testing.assert_allclose(np.array(emb, dtype=np.float32), clip.embed_images([data])[0], atol=1e-5)


def test_picks_up_images_added_by_another_process(tiny_checkpoint: Path, index_dir: Path, tmp_path: Path,
                                                  clip: CLIPInference) -> None:
    import time

    from index import ImageIndex

    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    settings = Settings(checkpoint=tiny_checkpoint, index=copy, index_reload_s=0.1)
    with TestClient(create_app(settings)) as c:
        assert c.get("/info").json()["index"]["size"] == 12
        extra = copy / "images" / "extra.png"
        extra.write_bytes(shape_image("square", "red", size=44))
        with ImageIndex.open(copy) as writer:  # as `clipforge index add` would, from outside the service
            writer.add_files(clip, [extra], ["an extra red square"])
        deadline = time.monotonic() + 10
        while c.get("/info").json()["index"]["size"] != 13 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/info").json()["index"]["size"] == 13
        hits = c.get("/search", params={"q": "an extra red square", "k": 13}).json()["results"]
        assert any(h["path"] == "images/extra.png" for h in hits)


def test_a_service_set_to_map_its_index_answers_as_one_that_reads_it(tiny_checkpoint: Path, index_dir: Path) -> None:
    queries = [{"q": "a red square", "k": 5}, {"q": "a blue circle", "k": 12}]
    answers = []
    for mmap in (False, True):
        with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, index=index_dir, index_mmap=mmap))) as c:
            assert c.app.state.service.index._mmap is mmap
            answers.append([c.get("/search", params=q).json()["results"] for q in queries])
    assert answers[0] == answers[1] and all(len(r) == q["k"] for r, q in zip(answers[1], queries))
