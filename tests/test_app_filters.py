"""Filtered search through the service: GET /search and POST /search/image with metadata filters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_app_support import COLORS, shape_image

from app.main import create_app
from app.settings import Settings
from model import CLIPInference

SHAPES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def clip(tiny_checkpoint: Path) -> CLIPInference:
    return CLIPInference.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, clip: CLIPInference) -> Path:
    """12 images in one folder per colour, 32 to 98 px wide, captions naming colour and shape."""
    from index import ImageIndex

    directory = tmp_path_factory.mktemp("filtered") / "idx"
    idx = ImageIndex.create(directory, clip)
    paths, captions = [], []
    for c, color in enumerate(COLORS):
        (directory / color).mkdir()
        for s, shape in enumerate(SHAPES):
            path = directory / color / f"{shape}.png"
            path.write_bytes(shape_image(shape, color, size=32 + 22 * s + c))
            paths.append(path)
            captions.append(f"a {color} {shape}")
    assert len(idx.add_files(clip, paths, captions).added) == 12
    idx.close()
    return directory


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path, index_dir: Path) -> TestClient:
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, index=index_dir, max_k=20))) as test_client:
        yield test_client


def _paths(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [hit["path"] for hit in response.json()["results"]]


def test_text_search_keeps_only_what_passes(client: TestClient) -> None:
    assert sorted(_paths(client.get("/search", params={"q": "a shape", "k": 20, "path_prefix": "red/"}))) == [
        "red/circle.png", "red/square.png", "red/triangle.png"]
    assert _paths(client.get("/search", params={"q": "a shape", "k": 1, "path_prefix": "blue/"}))[0].startswith("blue/")
    squares = _paths(client.get("/search", params={"q": "x", "k": 20, "caption_contains": "square"}))
    assert sorted(squares) == [f"{c}/square.png" for c in sorted(COLORS)]
    wide = client.get("/search", params={"q": "x", "k": 20, "min_width": 76}).json()["results"]
    assert len(wide) == 4 and all(hit["width"] >= 76 for hit in wide)
    both = _paths(client.get("/search", params={"q": "x", "k": 20, "min_height": 54, "path_prefix": "green/"}))
    assert sorted(both) == ["green/square.png", "green/triangle.png"]
    assert _paths(client.get("/search", params={"q": "x", "added_after": "2999-01-01"})) == []
    assert len(_paths(client.get("/search", params={"q": "x", "k": 20, "added_before": "2999-01-01T00:00:00Z"}))) == 12


def test_the_filtered_ranking_is_the_unfiltered_one_restricted(client: TestClient) -> None:
    everything = _paths(client.get("/search", params={"q": "a red circle", "k": 12}))
    red = _paths(client.get("/search", params={"q": "a red circle", "k": 3, "path_prefix": "red/"}))
    assert red == [p for p in everything if p.startswith("red/")]


def test_image_search_takes_the_filters_as_form_fields(client: TestClient) -> None:
    files = {"image": ("q.png", shape_image("circle", "blue", 48), "image/png")}
    found = _paths(client.post("/search/image", files=files, data={"k": "20", "path_prefix": "yellow/", "min_width": "50"}))
    assert sorted(found) == ["yellow/square.png", "yellow/triangle.png"]
    refused = client.post("/search/image", files=files, data={"min_height": "0"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize("params, code", [
    ({"min_width": 0}, "validation_error"), ({"min_width": 1 << 21}, "validation_error"),
    ({"min_height": "tall"}, "validation_error"), ({"path_prefix": ""}, "validation_error"),
    ({"caption_contains": "x" * 1025}, "validation_error"), ({"caption_contains": "a\x00b"}, "invalid_text"),
    ({"path_prefix": "   "}, "invalid_text"), ({"added_after": "yesterday"}, "validation_error"),
    ({"added_after": "2026-02-30"}, "invalid_filter"),
    ({"added_after": "2026-12-02", "added_before": "2026-12-01"}, "invalid_filter"),
    ({"added_before": "2" * 40}, "validation_error"),
])
def test_bad_filters_are_422(client: TestClient, params: dict, code: str) -> None:
    response = client.get("/search", params={"q": "x", **params})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code


def test_the_schema_states_the_filters_and_their_limits(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"]["/search"]["get"]["parameters"]}
    for name in ("path_prefix", "caption_contains", "added_after", "added_before", "min_width", "min_height"):
        assert name in params and not params[name]["required"]
    assert '"maxLength": 1024' in str(params["path_prefix"]["schema"]).replace("'", '"')
    body = spec["paths"]["/search/image"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    ref = body["$ref"].rsplit("/", 1)[-1]
    assert {"path_prefix", "min_height"} <= set(spec["components"]["schemas"][ref]["properties"])


def test_the_api_limits_are_the_index_limits() -> None:
    from app import search_filters
    from index import search_filter

    assert search_filters.MAX_FILTER_TEXT == search_filter.MAX_FILTER_CHARS
    assert search_filters.MAX_SIDE == search_filter.MAX_SIDE


def test_one_batch_serves_queries_with_different_filters(index_dir: Path, clip: CLIPInference) -> None:
    """Concurrent searches share one batch; each keeps its own filter, k and min_score."""
    from app.index_search import IndexSearcher
    from app.model_worker import ModelWorker
    from index import ImageIndex
    from index.search_filter import SearchFilter

    idx = ImageIndex.open(index_dir)
    vectors = clip.embed_texts(["a red circle", "a blue square", "a green triangle"])
    queries = [
        (vectors[0], 5, None, SearchFilter(path_prefix="red/")),
        (vectors[1], 2, None, SearchFilter(path_prefix="blue/")),
        (vectors[2], 12, None, None),
        (vectors[0], 12, 2.0, SearchFilter(path_prefix="red/")),
    ]
    batches: list[int] = []

    async def run_all() -> list:
        worker = ModelWorker(max_batch_size=8, max_wait_ms=200)
        searcher = IndexSearcher(idx, worker)
        plain = searcher._search_batch
        searcher._batcher.fn = lambda batch: batches.append(len(batch)) or plain(batch)
        worker.start()
        try:
            return await asyncio.gather(*(searcher.search(*query) for query in queries))
        finally:
            await worker.stop()

    found = asyncio.run(run_all())
    assert batches == [4]
    alone = [idx.search_by_vector(v[None], k, filter=f)[0] for v, k, _, f in queries[:3]]
    assert [[h.path for h in hits] for hits in found[:3]] == [[h.path for h in hits] for hits in alone]
    assert [len(hits) for hits in found] == [3, 2, 12, 0]
    assert all(h.path.startswith("red/") for h in found[0]) and all(h.path.startswith("blue/") for h in found[1])
    idx.close()
