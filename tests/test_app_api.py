"""The service without an index, through FastAPI's TestClient: model endpoints, errors, auth, limits, settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_app_support import API_KEY, png_bomb, shape_image, truncated_jpeg

from app.main import create_app
from app.settings import Settings, SettingsError, load_settings
from model import CLIPInference, update_meta


@pytest.fixture(scope="module")
def clip(tiny_checkpoint: Path) -> CLIPInference:
    return CLIPInference.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path) -> TestClient:
    settings = Settings(checkpoint=tiny_checkpoint, api_keys=[API_KEY], max_upload_bytes=2 * 1024 * 1024,
                        max_texts=8, max_text_chars=200, max_labels=50)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# ---------------------------------------------------------------------- system
def test_health_ready_and_info(client: TestClient, clip: CLIPInference) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model": True, "index": False}
    info = client.get("/info").json()
    assert info["preset"] == "mini-32"
    assert info["model"] == clip.model_id and info["dim"] == 128
    assert info["config"]["img_size"] == 32
    assert info["default_labels"] == ["circle", "square", "triangle"]
    assert info["index"] is None
    assert info["limits"]["max_texts"] == 8
    assert info["params"]["total"] > 0


def test_not_ready_before_startup(tiny_checkpoint: Path) -> None:
    app = create_app(Settings(checkpoint=tiny_checkpoint))
    bare = TestClient(app)  # no `with`: the lifespan (model loading) never ran
    assert bare.get("/healthz").status_code == 200
    assert_error(bare.get("/readyz"), 503, "not_ready")
    assert_error(bare.post("/embed/text", json={"texts": ["a"]}), 503, "not_ready")
    assert_error(bare.post("/classify", files={"image": ("a.png", shape_image())}), 503, "not_ready")


def test_search_without_index_is_503(client: TestClient) -> None:
    err = assert_error(client.get("/search", params={"q": "a red circle"}), 503, "not_ready")
    assert "--index" in err["message"]
    assert_error(client.get("/images/0"), 503)
    assert_error(client.post("/search/image", files={"image": ("a.png", shape_image())}), 503)


def test_page_and_static(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()
    assert client.get("/static/app.js").status_code == 200


# ---------------------------------------------------------------------- classify
def test_classify_matches_inference_api(client: TestClient, clip: CLIPInference) -> None:
    image = shape_image("circle", "red")
    labels = ["circle", "square", "triangle", "star"]
    r = client.post("/classify", files={"image": ("c.png", image, "image/png")}, data={"labels": labels})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == clip.model_id
    preds = body["predictions"]
    assert sorted(p["label"] for p in preds) == sorted(labels)
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
    expected = {p["label"]: p for p in clip.classify(image, labels)}
    for p in preds:
        assert p["probability"] == pytest.approx(expected[p["label"]]["probability"], abs=1e-5)
        assert p["similarity"] == pytest.approx(expected[p["label"]]["similarity"], abs=1e-5)


def test_classify_default_labels_templates_and_top_k(client: TestClient, clip: CLIPInference) -> None:
    image = shape_image("square", "blue")
    r = client.post("/classify", files={"image": ("s.png", image)}, data={"top_k": "2", "templates": ["a drawing of a {}"]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2
    expected = clip.classify(image, None, ["a drawing of a {}"], top_k=2)
    assert [p["label"] for p in preds] == [e["label"] for e in expected]


def test_classify_without_any_labels_is_422(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bare = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, bare)
    update_meta(bare, class_names=[])
    with TestClient(create_app(Settings(checkpoint=bare))) as c:
        err = assert_error(c.post("/classify", files={"image": ("a.png", shape_image())}), 422, "missing_labels")
        assert "labels" in err["message"]
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# default labels\ncat\n\ndog\n", encoding="utf-8")
    with TestClient(create_app(Settings(checkpoint=bare, labels_file=labels_file))) as c:
        r = c.post("/classify", files={"image": ("a.png", shape_image())})
        assert r.status_code == 200
        assert sorted(p["label"] for p in r.json()["predictions"]) == ["cat", "dog"]


# ---------------------------------------------------------------------- similarity and embed
def test_similarity_in_input_order(client: TestClient, clip: CLIPInference) -> None:
    image = shape_image("triangle", "green")
    texts = ["a green triangle", "a red circle", "a blue square"]
    r = client.post("/similarity", files={"image": ("t.png", image)}, data={"texts": texts})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["text"] for x in results] == texts
    expected = clip.rank_texts(image, texts)
    for got, want in zip(results, expected):
        assert got["similarity"] == pytest.approx(want["similarity"], abs=1e-5)
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)


def test_embed_text_matches_and_is_normalised(client: TestClient, clip: CLIPInference) -> None:
    texts = ["a red circle", "a big blue square", "a red circle"]
    r = client.post("/embed/text", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    emb = np.array(body["embeddings"], dtype=np.float32)
    assert body["dim"] == 128 and emb.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, clip.embed_texts(texts), atol=1e-5)


def test_embed_image_reports_bad_items_and_embeds_the_rest(client: TestClient, clip: CLIPInference) -> None:
    good = [shape_image("circle", "red"), shape_image("square", "yellow")]
    files = [("images", ("a.png", good[0])), ("images", ("bad.jpg", b"not an image")), ("images", ("b.png", good[1]))]
    r = client.post("/embed/image", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.png", "bad.jpg", "b.png"]
    assert results[1]["embedding"] is None and results[1]["error"]["code"] == "unsupported_image"
    emb = np.array([results[0]["embedding"], results[2]["embedding"]], dtype=np.float32)
    np.testing.assert_allclose(emb, clip.embed_images(good), atol=1e-5)


# ---------------------------------------------------------------------- bad inputs
def test_bad_images(client: TestClient) -> None:
    def post(data: bytes, name: str = "x.jpg"):
        return client.post("/classify", files={"image": (name, data)}, data={"labels": ["a", "b"]})

    assert_error(post(b""), 422, "empty_image")
    assert_error(post(b"hello, I am a text file\n", "notes.jpg"), 415, "unsupported_image")
    assert_error(post(truncated_jpeg()), 422, "corrupt_image")
    err = assert_error(post(png_bomb(), "bomb.png"), 413, "image_too_large")
    assert "50000x50000" in err["message"]


def test_upload_size_limit_enforced_while_reading(client: TestClient) -> None:
    big = b"\xff" * (3 * 1024 * 1024)
    assert_error(client.post("/classify", files={"image": ("big.jpg", big)}), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit is hit while streaming
        for _ in range(40):
            yield b"x" * (100 * 1024)

    r = client.post("/embed/text", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "payload_too_large")


def test_text_limits(client: TestClient) -> None:
    assert_error(client.post("/embed/text", json={"texts": ["x"] * 9}), 422, "too_many_texts")
    assert_error(client.post("/embed/text", json={"texts": ["x" * 201]}), 422, "text_too_long")
    assert_error(client.post("/embed/text", json={"texts": []}), 422, "validation_error")
    assert_error(client.post("/embed/text", json={"texts": ["a\x00b"]}), 422, "invalid_text")
    assert_error(client.post("/embed/text", json={"texts": ["   "]}), 422, "invalid_text")
    lone = '{"texts": ["bad \\udcff surrogate"]}'
    assert_error(client.post("/embed/text", content=lone, headers={"content-type": "application/json"}), 422, "invalid_text")
    raw = b'{"texts": ["caf\xc3\x28 \xff"]}'
    r = client.post("/embed/text", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert_error(client.post("/embed/text", content=b"{not json", headers={"content-type": "application/json"}), 422)
    labels = [f"label {i}" for i in range(51)]
    assert_error(client.post("/classify", files={"image": ("a.png", shape_image())}, data={"labels": labels}), 422,
                 "too_many_texts")
    many = [f"l{i}" for i in range(10_000)]  # past the form parser's field limit: the same 422, not its 400
    r = client.post("/classify", files={"image": ("a.png", shape_image())}, data={"labels": many})
    assert_error(r, 422, "too_many_texts")
    files = [("images", (f"{i}.png", b"x")) for i in range(34)]  # max_images is 32
    assert_error(client.post("/embed/image", files=files), 422, "too_many_images")
    assert_error(client.post("/classify", files={"image": ("a.png", shape_image())}, data={"top_k": "0"}), 422)


def test_invalid_utf8_in_form_fields_is_422(client: TestClient) -> None:
    """Starlette would decode these as latin-1 ("cafÃ("); the raw bytes are checked instead."""
    image = {"image": ("a.png", shape_image())}
    bad = b"caf\xc3\x28"
    cases = [("/classify", {"labels": [bad, "dog"]}), ("/classify", {"labels": ["a", "b"], "templates": [bad]}),
             ("/similarity", {"texts": ["ok", b"\xff\xfe"]})]
    for path, data in cases:
        err = assert_error(client.post(path, files=image, data=data), 422, "invalid_text")
        assert "UTF-8" in err["message"]
    # text that only looks like a latin-1 fallback is fine when it arrives as valid UTF-8
    r = client.post("/classify", files=image, data={"labels": ["cafÃ(", "café", "ÿþ"]})
    assert r.status_code == 200, r.text
    assert sorted(p["label"] for p in r.json()["predictions"]) == sorted(["cafÃ(", "café", "ÿþ"])


def test_strict_form_parsing_checks_only_the_text_fields_routes_read(client: TestClient) -> None:
    image = {"image": ("a.png", shape_image())}
    # a field no route reads may carry any bytes, as before
    r = client.post("/classify", files=image, data={"labels": ["a", "b"], "other": b"\xff\xfe"})
    assert r.status_code == 200, r.text
    # a charset Python has no text codec for: the text fields are held to UTF-8 instead of a 400
    boundary = "cfboundary"
    parts = [b'--cfboundary\r\nContent-Disposition: form-data; name="labels"\r\n\r\ncat\r\n',
             b'--cfboundary\r\nContent-Disposition: form-data; name="labels"\r\n\r\ndog\r\n',
             b'--cfboundary\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
             b"Content-Type: image/png\r\n\r\n" + shape_image() + b"\r\n", b"--cfboundary--\r\n"]
    for charset, label, status in (("base64", b"dog", 200), ("nonsense-codec", b"dog", 200), ("base64", b"\xff", 422)):
        body = b"".join(parts).replace(b"\r\n\r\ndog", b"\r\n\r\n" + label)
        r = client.post("/classify", content=body,
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}; charset={charset}"})
        assert r.status_code == status, (charset, r.text)


def test_labels_times_templates_is_capped(tiny_checkpoint: Path) -> None:
    assert Settings(checkpoint=tiny_checkpoint, max_labels=100).prompt_limit == 800
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, max_prompts=12))) as c:
        image = {"image": ("a.png", shape_image())}
        ok = c.post("/classify", files=image, data={"labels": ["a", "b"]})  # 2 x 6 default templates
        assert ok.status_code == 200, ok.text
        r = c.post("/classify", files=image, data={"labels": ["a", "b", "c"]})
        err = assert_error(r, 422, "too_many_prompts")
        assert "18 prompts" in err["message"] and "12" in err["message"]
        templates = ["a {}", "the {}", "one {}", "{} here", "{}!"]
        assert_error(c.post("/classify", files=image, data={"labels": ["a", "b", "c"], "templates": templates}),
                     422, "too_many_prompts")
        assert c.get("/info").json()["limits"]["max_prompts"] == 12
        # The server's own labels (3 class names x 6 templates = 18) are the operator's choice: not capped.
        r = c.post("/classify", files=image)
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 3


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.delete("/classify"), 405, "method_not_allowed")


# ---------------------------------------------------------------------- request ids, logs, metrics
def test_request_id_echoed_or_generated(client: TestClient) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    unsafe = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert unsafe != "bad id\twith spaces" and len(unsafe) == 32


def test_metrics_exposes_routes_and_batches(client: TestClient) -> None:
    client.post("/embed/text", json={"texts": ["metrics probe"]})
    text = client.get("/metrics").text
    assert 'clipforge_requests_total{method="POST",route="/embed/text",status="200"}' in text
    assert 'clipforge_request_duration_seconds_count{method="POST",route="/embed/text"}' in text
    assert 'clipforge_batch_size_count{kind="text"}' in text
    assert 'clipforge_queue_wait_seconds_count{kind="text"}' in text
    assert "clipforge_index_size" in text


@pytest.fixture()
def json_logging():
    """configure_logging for one test, then the logging set-up other tests expect is put back."""
    import logging

    from app.logs import configure_logging

    names = ("clipforge", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate,
                 logging.getLogger(n).disabled) for n in names}
    yield configure_logging
    for name, (handlers, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.level, logger.propagate, logger.disabled = handlers, level, propagate, disabled


def test_json_log_lines_carry_request_id(client: TestClient, capsys: pytest.CaptureFixture[str], json_logging) -> None:
    json_logging("info")  # inside the test, so the handler writes to the captured stderr
    client.get("/healthz", headers={"X-Request-ID": "log-probe-1"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("request_id") == "log-probe-1"]
    assert access and access[0]["route"] == "/healthz" and access[0]["status"] == 200


# ---------------------------------------------------------------------- auth
def test_writes_need_a_valid_key(client: TestClient) -> None:
    assert_error(client.delete("/images/1"), 401, "unauthorized")
    assert_error(client.delete("/images/1", headers={"Authorization": "Bearer wrong-key-000"}), 403, "forbidden")
    assert_error(client.delete("/images/1", headers={"Authorization": f"Basic {API_KEY}"}), 401)
    # a valid key gets past auth to the next check: no index here
    assert_error(client.delete("/images/1", headers={"Authorization": f"Bearer {API_KEY}"}), 503, "not_ready")


def test_no_keys_means_writes_disabled_and_protect_reads(tiny_checkpoint: Path) -> None:
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint))) as c:
        assert_error(c.delete("/images/1", headers={"Authorization": "Bearer anything-at-all"}), 403, "writes_disabled")
    settings = Settings(checkpoint=tiny_checkpoint, api_keys=[API_KEY, "second-key-abcdef"], protect_reads=True)
    with TestClient(create_app(settings)) as c:
        assert_error(c.get("/info"), 401)
        assert_error(c.get("/info", headers={"Authorization": "Bearer not-the-key"}), 403)
        assert c.get("/info", headers={"Authorization": "Bearer second-key-abcdef"}).status_code == 200
        assert c.get("/healthz").status_code == 200  # probes stay open


def test_protect_reads_leaves_the_page_and_schema_open(tiny_checkpoint: Path) -> None:
    """As documented on the setting: the page, its files and the schema need no key; the page sends a typed one."""
    assert "/openapi.json" in Settings.model_fields["protect_reads"].description
    settings = Settings(checkpoint=tiny_checkpoint, api_keys=[API_KEY], protect_reads=True)
    with TestClient(create_app(settings)) as c:
        for path in ("/", "/static/app.js", "/openapi.json", "/docs", "/healthz", "/readyz"):
            assert c.get(path).status_code == 200, path
        for path in ("/info", "/metrics", "/search?q=x"):
            assert_error(c.get(path), 401)
        assert 'id="api-key"' in c.get("/").text
        assert "Authorization: `Bearer ${key}`" in c.get("/static/app.js").text


# ---------------------------------------------------------------------- settings
def test_settings_from_environment(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFORGE_CHECKPOINT", str(tiny_checkpoint))
    monkeypatch.setenv("CLIPFORGE_API_KEYS", "first-key-1234, second-key-5678")
    monkeypatch.setenv("CLIPFORGE_CORS_ORIGINS", '["http://localhost:3000"]')
    monkeypatch.setenv("CLIPFORGE_BATCHING", "false")
    s = load_settings(port=9001)
    assert [k.get_secret_value() for k in s.api_keys] == ["first-key-1234", "second-key-5678"]
    assert s.cors_origins == ["http://localhost:3000"] and s.port == 9001
    assert s.effective_batch_size == 1
    assert "first-key-1234" not in repr(s)


def test_settings_share_the_model_defaults(tiny_checkpoint: Path) -> None:
    """The pixel guard is the model's default, and `auto` means what it means to every other command."""
    import torch

    from model import DEFAULT_MAX_PIXELS

    assert Settings(checkpoint=tiny_checkpoint).max_pixels == DEFAULT_MAX_PIXELS
    assert Settings(checkpoint=tiny_checkpoint, device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert Settings(checkpoint=tiny_checkpoint).device == "cpu"


def test_log_timestamps_are_utc_to_the_millisecond() -> None:
    import logging

    from app.logs import JSONFormatter

    record = logging.makeLogRecord({"msg": "m", "created": 1_700_000_000.25, "msecs": 250.0})
    assert json.loads(JSONFormatter().format(record))["ts"] == "2023-11-14T22:13:20.250Z"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CLIPFORGE_PORT": "99999"}, "CLIPFORGE_PORT"),
        ({"CLIPFORGE_MAX_K": "0"}, "CLIPFORGE_MAX_K"),
        ({"CLIPFORGE_BATCHING": "maybe"}, "CLIPFORGE_BATCHING"),
        ({"CLIPFORGE_API_KEYS": "short"}, "CLIPFORGE_API_KEYS"),
        ({"CLIPFORGE_INDEX": "/nonexistent/index"}, "CLIPFORGE_INDEX"),
        ({"CLIPFORGE_CHECKPOINT": "/nonexistent/ckpt"}, "CLIPFORGE_CHECKPOINT"),
        ({"CLIPFORGE_PROTECT_READS": "true"}, "protect_reads"),
        ({"CLIPFORGE_LOG_LEVEL": "loud"}, "CLIPFORGE_LOG_LEVEL"),
        ({"CLIPFORGE_SHUTDOWN_TIMEOUT_S": "0"}, "CLIPFORGE_SHUTDOWN_TIMEOUT_S"),
        ({"CLIPFORGE_MAX_PROMPTS": "0"}, "CLIPFORGE_MAX_PROMPTS"),
        ({"CLIPFORGE_DEVICE": "gpu0"}, "CLIPFORGE_DEVICE"),
    ],
)
def test_invalid_settings_name_the_setting(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    monkeypatch.setenv("CLIPFORGE_CHECKPOINT", str(tiny_checkpoint))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=named) as info:
        load_settings()
    assert "short" not in str(info.value) or named != "CLIPFORGE_API_KEYS" or "at least 8" in str(info.value)


def test_shutdown_timeout_reaches_uvicorn_unrounded(tiny_checkpoint: Path) -> None:
    """uvicorn reads a graceful-shutdown timeout of None (or 0) as "wait forever"; 0.5 s must stay 0.5 s."""
    from app.cli import uvicorn_options

    options = uvicorn_options(Settings(checkpoint=tiny_checkpoint, shutdown_timeout_s=0.5))
    assert options["timeout_graceful_shutdown"] == 0.5
    assert uvicorn_options(Settings(checkpoint=tiny_checkpoint))["timeout_graceful_shutdown"] == 10.0


def test_info_passes_through_stored_evaluation_metrics(tiny_checkpoint: Path, tmp_path: Path) -> None:
    evaluated = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, evaluated)
    metrics = {"cifar10": {"top1": 0.668, "top5": 0.97}, "flickr8k_1k": {"i2t_r@1": 0.12}, "val_loss": 2.5}
    update_meta(evaluated, metrics=metrics)
    with TestClient(create_app(Settings(checkpoint=evaluated))) as c:
        assert c.get("/info").json()["metrics"] == metrics


def test_openapi_contract(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    expected = {
        ("/classify", "post"): "classify", ("/search", "get"): "search", ("/search/image", "post"): "search_by_image",
        ("/similarity", "post"): "similarity", ("/embed/text", "post"): "embed_text",
        ("/embed/image", "post"): "embed_image", ("/images/{id}", "get"): "get_image",
        ("/images", "post"): "add_images", ("/images/{id}", "delete"): "delete_image", ("/info", "get"): "info",
        ("/healthz", "get"): "healthz", ("/readyz", "get"): "readyz", ("/metrics", "get"): "metrics",
    }
    for (path, method), op_id in expected.items():
        op = schema["paths"][path][method]
        assert op["operationId"] == op_id and op["tags"], (path, method)
    body = schema["components"]["schemas"]["Body_classify"]["properties"]
    assert body["labels"]["type"] == "array" and body["labels"]["items"]["type"] == "string"
    assert schema["components"]["schemas"]["Body_similarity"]["properties"]["texts"]["type"] == "array"
    classify_responses = schema["paths"]["/classify"]["post"]["responses"]
    for status in ("413", "415", "422", "503"):
        ref = classify_responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    get_image = schema["paths"]["/images/{id}"]["get"]["responses"]  # thumbnails of a stored bomb or a broken file
    for status in ("401", "403", "404", "413", "415", "422", "503"):
        assert get_image[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), status


def test_unexpected_errors_are_json_and_logged(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A fault inside a route (injected: the scorer raises) gives the JSON error shape, never a traceback."""
    app = create_app(Settings(checkpoint=tiny_checkpoint))
    with TestClient(app, raise_server_exceptions=False) as c:
        clip = app.state.service.clip

        def broken(*args, **kwargs):
            raise RuntimeError("injected fault")

        monkeypatch.setattr(clip, "scores", broken)
        with caplog.at_level("ERROR", logger="clipforge.app"):
            r = c.post("/similarity", files={"image": ("a.png", shape_image())}, data={"texts": ["a"]},
                       headers={"X-Request-ID": "fault-1"})
        err = assert_error(r, 500, "internal_error")
        assert "fault-1" in err["message"] and r.headers["x-request-id"] == "fault-1"
        assert "injected fault" not in r.text and "Traceback" not in r.text
        assert any(getattr(rec, "request_id", None) == "fault-1" and rec.exc_info for rec in caplog.records)
        assert c.get("/healthz").status_code == 200


def test_cors_preflight_allows_configured_origins(tiny_checkpoint: Path) -> None:
    settings = Settings(checkpoint=tiny_checkpoint, cors_origins=["http://localhost:3000"])
    with TestClient(create_app(settings)) as c:
        ok = c.options("/search", headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"})
        assert ok.headers.get("access-control-allow-origin") == "http://localhost:3000"
        other = c.options("/search", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in other.headers


def test_empty_environment_values_mean_unset(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An env file with `CLIPFORGE_LABELS_FILE=` (as in deploy/clipforge.env.example) keeps the defaults."""
    monkeypatch.setenv("CLIPFORGE_CHECKPOINT", str(tiny_checkpoint))
    for name in ("CLIPFORGE_LABELS_FILE", "CLIPFORGE_INDEX", "CLIPFORGE_API_KEYS", "CLIPFORGE_CORS_ORIGINS"):
        monkeypatch.setenv(name, "")
    s = load_settings()
    assert s.labels_file is None and s.index is None and s.api_keys == [] and s.cors_origins == []
