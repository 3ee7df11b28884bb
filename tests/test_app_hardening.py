"""Serving hardening (issue 16): prompt size and the memory it costs, the key before the body, slow and silent
clients on real sockets, JSON errors for Range and image faults, a truthful /readyz, bounded queues."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient
from pydantic import BaseModel
from test_app_index import build_index
from test_app_support import API_KEY, live_server, shape_image

from app.batching import MicroBatcher, QueueFull
from app.dependencies import prompt_sizes, require_write_key
from app.limits import PROMPT_BYTES_PER_TOKEN, ServingLimits
from app.main import create_app
from app.route_table import reachable_routes, route_table
from app.settings import Settings
from model import CLIPInference, label_prompts

AUTH = {"Authorization": f"Bearer {API_KEY}"}
IMAGE = {"image": ("a.png", shape_image())}


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    return body["error"]


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path) -> TestClient:
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, api_keys=[API_KEY]), ServingLimits())) as c:
        yield c


# ---------------------------------------------------------------------- prompt size
def test_prompt_sizes_match_the_expanded_prompts() -> None:
    labels = ["cat", "ünïcødé", "😀" * 5, "a {} in it"]
    templates = ["a photo of a {}.", "{} and {}", "no slot", "{}{}{}"]
    built = [len(p.encode("utf-8")) for p in label_prompts(labels, templates)]
    assert prompt_sizes(labels, templates) == (max(built), sum(built))
    assert prompt_sizes([], templates) == (0, 0)


def test_long_expanded_prompts_are_refused_before_tokenizing(client: TestClient) -> None:
    # 499 slots x a 1,000-character label: a 499,000-character prompt from two texts within max_text_chars
    r = client.post("/classify", files=IMAGE, data={"labels": ["x" * 1000], "templates": ["{}" * 499]})
    err = assert_error(r, 422, "prompt_too_long")
    context = client.app.state.service.clip.tokenizer.max_length
    assert f"the limit is {PROMPT_BYTES_PER_TOKEN * context:,}" in err["message"]  # bytes per token x the context
    emoji = [f"{i:03d}" + "\U0001F600" * 997 for i in range(200)]  # 1,000 characters, 3,991 bytes of UTF-8 each, x 8 templates
    templates = [f"a photo {i} of a {{}}" for i in range(8)]
    assert_error(client.post("/classify", files=IMAGE, data={"labels": emoji, "templates": templates}), 422,
                 "prompt_too_long")
    many = [f"label number {i} " + "y" * 40 for i in range(1000)]  # each fits, together 8,000 x ~75 bytes
    err = assert_error(client.post("/classify", files=IMAGE, data={"labels": many, "templates": templates}), 422,
                       "prompts_too_large")
    assert "262,144" in err["message"]
    ok = client.post("/classify", files=IMAGE, data={"labels": ["circle", "square"], "templates": templates})
    assert ok.status_code == 200, ok.text
    limits = client.get("/info").json()["limits"]
    assert limits["max_prompt_bytes"] == PROMPT_BYTES_PER_TOKEN * context and limits["max_prompt_bytes_total"] == 256 * 1024


def _vm_hwm_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    return build_index(tmp_path_factory.mktemp("hardening") / "idx", CLIPInference.load(tiny_checkpoint))


SLOW_ENV = {"CLIPFORGE_API_KEYS": API_KEY, "CLIPFORGE_HEADER_TIMEOUT_S": "1", "CLIPFORGE_BODY_IDLE_TIMEOUT_S": "1",
            "CLIPFORGE_BODY_TIMEOUT_S": "3", "CLIPFORGE_MAX_CONNECTIONS": "24", "CLIPFORGE_MAX_HEAD_BYTES": "16384"}


@pytest.fixture(scope="module")
def live(tiny_checkpoint: Path, index_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with live_server(SLOW_ENV, ["--checkpoint", str(tiny_checkpoint), "--index", str(index_dir), "--threads", "1"],
                     log) as server:
        yield server


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_hostile_prompts_keep_the_server_small(live) -> None:
    """Peak resident memory of the real server across the issue's requests: it must not do the work."""
    with httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.post("/classify", files=IMAGE, data={"labels": ["circle", "square"]}).status_code == 200
        before = _vm_hwm_mb(live.proc.pid)
        templates = [f"a photo {i} of a {{}}" for i in range(8)]
        attacks = [
            ({"labels": [f"{i:03d}" + "z" * 997 for i in range(8)], "templates": ["{}" * 499]}, "prompt_too_long"),
            ({"labels": [f"{i:03d}" + "\U0001F600" * 997 for i in range(200)], "templates": templates}, "prompt_too_long"),
            ({"labels": [f"{i:04d}" + "\U0001F600" * 50 for i in range(1000)], "templates": templates},  # each fits
             "prompts_too_large"),
        ]
        started = time.monotonic()
        for data, code in attacks:
            assert_error(c.post("/classify", files=IMAGE, data=data), 422, code)
        elapsed = time.monotonic() - started
        grown = _vm_hwm_mb(live.proc.pid) - before
    assert grown < 100, f"peak resident memory grew {grown:.0f} MB"  # tokenizing them costs > 1,000 MB
    assert elapsed < 20, elapsed


# ---------------------------------------------------------------------- the key before the body
def test_protected_reads_answer_401_before_reading_the_body(tiny_checkpoint: Path) -> None:
    settings = Settings(checkpoint=tiny_checkpoint, api_keys=[API_KEY], protect_reads=True, max_upload_bytes=1024 * 1024)
    with TestClient(create_app(settings, ServingLimits())) as c:
        bad_json = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        assert_error(c.post("/embed/text", **bad_json), 401, "unauthorized")
        forty = [("images", (f"{i}.png", b"x")) for i in range(40)]
        assert_error(c.post("/embed/image", files=forty), 401, "unauthorized")
        big = {"content": b"\0" * (2 * 1024 * 1024), "headers": {"content-type": "application/octet-stream"}}
        assert_error(c.post("/classify", **big), 401, "unauthorized")  # not the 413 of a body never read
        wrong = {"Authorization": "Bearer not-the-key-0"}
        assert_error(c.post("/embed/image", files=forty, headers=wrong), 403, "forbidden")
        assert c.post("/embed/text", **bad_json).headers["www-authenticate"] == "Bearer"
        # with the key the body is read and judged as before
        assert_error(c.post("/embed/text", content=b"{not json", headers={**AUTH, "content-type": "application/json"}),
                     422, "validation_error")
        assert_error(c.post("/embed/image", files=forty, headers=AUTH), 422, "too_many_images")
        assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200


def test_writes_answer_401_before_reading_the_body(client: TestClient) -> None:
    forty = [("images", (f"{i}.png", b"x")) for i in range(40)]
    assert_error(client.post("/images", files=forty), 401, "unauthorized")
    assert_error(client.post("/images", files=forty, headers={"Authorization": "Bearer wrong-key-000"}), 403, "forbidden")
    # open reads stay open
    assert client.post("/embed/text", json={"texts": ["a red circle"]}).status_code == 200


class LateNote(BaseModel):
    note: str


async def _late_write(body: LateNote) -> dict[str, str]:
    return {"note": body.note}


async def _late_read() -> dict[str, str]:
    return {"note": "read"}


def test_the_route_table_is_flattened_once_and_follows_routes_added_later(tiny_checkpoint: Path) -> None:
    app = create_app(Settings(checkpoint=tiny_checkpoint, api_keys=[API_KEY]), ServingLimits())
    forty = [("images", (f"{i}.png", b"x")) for i in range(40)]
    with TestClient(app) as c:
        assert_error(c.post("/images", files=forty), 401, "unauthorized")  # the middleware stack and its table exist now
        table = route_table(app.router)
        flat = table.routes()
        assert flat == tuple(reachable_routes(app.router.routes))
        assert c.get("/healthz").status_code == 200 and table.routes() is flat  # matched again, not walked again
        # a router included after the first request (the app's list grows), then a route added to it (its list grows)
        late = APIRouter(prefix="/late")
        app.include_router(late)
        late.add_api_route("/note", _late_write, methods=["PUT"], dependencies=[Depends(require_write_key)])
        bad_json = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        assert_error(c.put("/late/note", **bad_json), 401, "unauthorized")  # the key before the body, not its 422
        assert c.put("/late/note", json={"note": "x"}, headers=AUTH).json() == {"note": "x"}
        late.add_api_route("/note", _late_read, methods=["GET"])
        r = c.options("/late/note")
        assert_error(r, 405, "method_not_allowed")
        assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "PUT"}  # the 405 handler reads the same table
        assert table.routes() is not flat and table.routes() == tuple(reachable_routes(app.router.routes))


# ---------------------------------------------------------------------- JSON errors, no object reprs
def test_range_errors_are_json(tiny_checkpoint: Path, index_dir: Path) -> None:
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, index=index_dir), ServingLimits())) as c:
        url = c.get("/search", params={"q": "a red circle", "k": 1}).json()["results"][0]["url"]
        whole = c.get(url)
        assert whole.status_code == 200
        part = c.get(url, headers={"Range": "bytes=0-9"})
        assert part.status_code == 206 and part.content == whole.content[:10]
        assert_error(c.get(url, headers={"Range": "bytes=5-1"}), 400, "invalid_range")
        err = assert_error(c.get(url, headers={"Range": "bytes=99999-"}), 416, "range_not_satisfiable")
        assert str(len(whole.content)) in err["message"]
        assert c.get(url, headers={"Range": "bytes=99999-"}).headers["content-range"] == f"bytes */{len(whole.content)}"
        assert_error(c.get("/static/nope.js"), 404, "not_found")


def test_error_messages_carry_no_object_reprs(client: TestClient) -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    err = assert_error(client.post("/classify", files={"image": ("a.svg", svg, "image/svg+xml")}), 415,
                       "unsupported_image")
    item = client.post("/embed/image", files=[("images", ("a.svg", svg))]).json()["results"][0]["error"]
    for message in (err["message"], item["message"]):
        assert " object at 0x" not in message and not re.search(r"0x[0-9a-fA-F]{6,}", message), message


def test_options_lists_every_method_of_the_path(client: TestClient) -> None:
    r = client.options("/images/1")
    assert_error(r, 405, "method_not_allowed")
    allowed = {m.strip() for m in r.headers["allow"].split(",")}
    assert allowed == {"GET", "DELETE"}
    assert client.head("/images/1").status_code == 405  # Allow is truthful: HEAD is not served here
    assert_error(client.put("/classify"), 405, "method_not_allowed")


# ---------------------------------------------------------------------- readiness and overload
def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_readyz_is_503_while_the_model_thread_hangs_or_after_it_dies(tiny_checkpoint: Path) -> None:
    app = create_app(Settings(checkpoint=tiny_checkpoint), ServingLimits(worker_stall_s=0.5))
    with TestClient(app) as c:
        worker = app.state.service.worker
        assert c.get("/readyz").status_code == 200
        release = threading.Event()
        c.portal.start_task_soon(worker.run, release.wait)  # the model thread is stuck in one job
        assert _wait_for(lambda: c.get("/readyz").status_code == 503)
        assert "heartbeat" in c.get("/readyz").json()["error"]["message"]
        release.set()
        assert _wait_for(lambda: c.get("/readyz").status_code == 200)
        worker.executor.shutdown(wait=True)  # the thread is gone
        assert _wait_for(lambda: c.get("/readyz").status_code == 503)
        assert_error(c.get("/readyz"), 503, "not_ready")


def test_a_full_batcher_queue_is_refused_at_once() -> None:
    async def main() -> None:
        gate = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher("t", lambda items: (gate.wait(), items)[1], pool, max_batch_size=1, max_wait_ms=0,
                                   max_queue=2)
            batcher.start()
            try:
                running = [asyncio.ensure_future(batcher.submit(0))]
                await asyncio.sleep(0.05)  # item 0 is running (blocked on the gate)
                running += [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]  # two wait
                await asyncio.sleep(0.05)
                started = time.perf_counter()
                with pytest.raises(QueueFull, match="2 requests waiting"):
                    await asyncio.wait_for(batcher.submit(99), 5)
                assert time.perf_counter() - started < 0.05
            finally:
                gate.set()  # a failed check must not leave the pool's thread waiting forever
            assert await asyncio.gather(*running) == [0, 1, 2]
            await batcher.stop()

    asyncio.run(main())


def test_overload_answers_503_with_retry_after(tiny_checkpoint: Path) -> None:
    settings = Settings(checkpoint=tiny_checkpoint, max_batch_size=1)  # one text per batch: one taken, the rest queue
    app = create_app(settings, ServingLimits(max_queue=2, retry_after_s=3))
    with TestClient(app) as c:
        state = app.state.service
        release, busy = threading.Event(), threading.Event()

        def hold() -> None:
            busy.set()
            release.wait()

        c.portal.start_task_soon(state.worker.run, hold)
        assert busy.wait(10)  # the model thread is busy before any request arrives
        with ThreadPoolExecutor(3) as pool:
            try:  # a failed assertion must not leave the pool waiting on the busy model thread
                def post(i: int):
                    return pool.submit(c.post, "/embed/text", json={"texts": [f"queued text {i}"]})

                queue = state.encoders.texts._queue
                waiting = [post(0), post(1)]  # two fit the queue of 2 whenever the batcher takes the first
                assert _wait_for(lambda: len(queue) == 1), (len(queue), [f.done() for f in waiting])  # one taken
                waiting.append(post(2))
                assert _wait_for(lambda: len(queue) == 2), (len(queue), [f.done() for f in waiting])  # two queued
                started = time.monotonic()
                r = c.post("/embed/text", json={"texts": ["one too many"]})
                assert time.monotonic() - started < 2
                err = assert_error(r, 503, "overloaded")
                assert r.headers["retry-after"] == "3" and "queue is full" in err["message"]
            finally:
                release.set()
            assert [f.result(timeout=60).status_code for f in waiting] == [200, 200, 200]
        assert c.post("/embed/text", json={"texts": ["after the rush"]}).status_code == 200


# ---------------------------------------------------------------------- slow and silent clients (real sockets)
def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


def test_silent_connections_are_closed(live) -> None:
    socks = [_connect(live.url) for _ in range(10)]
    try:
        results = [_read_until_closed(s, 10) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert all(data == b"" for data, _ in results)
    assert max(took for _, took in results) < 5  # header_timeout_s is 1


def test_headers_sent_a_byte_at_a_time_get_408(live) -> None:
    sock = _connect(live.url)
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    started = time.monotonic()
    try:
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            if time.monotonic() - started > 8:
                break
        data, _ = _read_until_closed(sock, 5)
    finally:
        sock.close()
    assert time.monotonic() - started < 8
    assert data.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in data, data[:200]


def test_a_head_over_the_limit_gets_431_and_garbage_gets_400_in_the_json_shape(live) -> None:
    """Answers only app/connections.py's protocol gives (uvicorn's own are plain text): it is the one serving."""
    sock = _connect(live.url)
    try:  # 16 KiB is the limit here; the head arrives in pieces, so no single read holds all of it
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for i in range(40):
            try:
                sock.sendall(f"X-Pad-{i}: ".encode() + b"a" * 1000 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        data, took = _read_until_closed(sock, 10)
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 431") and b'"headers_too_large"' in data, data[:300]
    assert took < 5
    fits = {f"X-Pad-{i}": "a" * 1000 for i in range(12)}  # 12 KiB: under the limit
    assert httpx.get(live.url + "/healthz", headers=fits, timeout=10).status_code == 200
    sock = _connect(live.url)
    try:
        sock.sendall(b"\x16\x03\x01 not HTTP at all\r\n\r\n")  # a TLS hello's first bytes, then noise
        data, _ = _read_until_closed(sock, 10)
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 400") and b'"bad_request"' in data and b"application/json" in data, data[:300]


def _post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_stalled_and_crawling_bodies_get_408(live) -> None:
    stalled = _connect(live.url)
    try:
        stalled.sendall(_post_head("/embed/text", 1000) + b'{"texts": ')
        data, took = _read_until_closed(stalled, 10)
    finally:
        stalled.close()
    assert data.startswith(b"HTTP/1.1 408") and b"no request body bytes arrived" in data, data[:300]
    assert took < 5
    crawling = _connect(live.url)
    started = time.monotonic()
    try:
        crawling.sendall(_post_head("/embed/text", 1000))
        crawling.settimeout(0.5)
        reply = b""
        while time.monotonic() - started < 10 and not reply:
            try:
                crawling.sendall(b" ")
                reply = crawling.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        elapsed = time.monotonic() - started
        if reply:  # the head and the body may arrive in separate segments
            reply += _read_until_closed(crawling, 5)[0]
    finally:
        crawling.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"within 3 s" in reply, reply[:300]
    assert 2.5 < elapsed < 8


def test_open_connections_are_capped(live) -> None:
    socks = [_connect(live.url) for _ in range(30)]  # the cap is 24 (the server counts this test's probes too)
    try:
        refused = []
        for s in socks:
            s.settimeout(0.5)
            try:
                refused.append(s.recv(65536))
            except TimeoutError:
                refused.append(None)
    finally:
        for s in socks:
            s.close()
    over = [data for data in refused if data]
    assert 6 <= len(over) <= 30 - 20, len(over)
    assert all(data.startswith(b"HTTP/1.1 503") and b'"overloaded"' in data and b"retry-after: 1" in data for data in over)
    assert _wait_for(lambda: httpx.get(live.url + "/healthz", timeout=5).status_code == 200)
