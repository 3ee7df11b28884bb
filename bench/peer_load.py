"""The peer benchmark's requests and load generator.

bench/service_bench.py's `drive` keeps every connection alive, but clip-retrieval's back end
(Flask's development server) answers each request with `Connection: close` and then neither
closes the socket nor reads a second request on it, so that client would stall. This one sends
each request over a kept connection while the server keeps it, and opens a new one (timed, as
part of that request) when the server said close; every server is driven by it alike.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import Callable
from urllib.parse import quote_plus

from service_bench import COLORS, PLACES, THINGS

SERVED_NAME = "vit-b-32"
K = 10
ENDPOINTS = ("text_embedding", "image_embedding", "search")
INDEX_NAME = "flickr8k"
BOUNDARY = "peerbenchboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def caption(i: int) -> str:
    """A different string for every serial number, so no text cache answers for the model."""
    rng = random.Random(i)
    return f"a {rng.choice(COLORS)} {rng.choice(THINGS)} {rng.choice(PLACES)} {i}"


def json_body(path: str, host: str, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def image_form(image: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="q.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def _image_post(path: str, host: str, image: bytes) -> bytes:
    body = image_form(image)
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {MULTIPART}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def data_uri(image: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(image).decode()


def knn_payload(text: str) -> dict:
    """clip-retrieval's /knn-service query: plain text-to-image, no filters or re-ranking models."""
    return {"text": text, "modality": "image", "num_images": K, "indice_name": INDEX_NAME, "use_mclip": False,
            "deduplicate": False, "use_safety_model": False, "use_violence_detector": False}


# Per server, per endpoint: (serial number, image bytes, host) -> one raw HTTP/1.1 request.
Builder = Callable[[int, bytes, str], bytes]
REQUESTS: dict[str, dict[str, Builder]] = {
    "clipforge": {
        "text_embedding": lambda i, img, host: json_body("/embed/text", host, {"texts": [caption(i)]}),
        "image_embedding": lambda i, img, host: _image_post("/embed/image", host, img),
        "search": lambda i, img, host: (f"GET /search?q={quote_plus(caption(i))}&k={K} HTTP/1.1\r\n"
                                        f"Host: {host}\r\n\r\n").encode(),
    },
    "infinity": {
        "text_embedding": lambda i, img, host: json_body("/embeddings", host,
                                                         {"model": SERVED_NAME, "input": [caption(i)]}),
        "image_embedding": lambda i, img, host: json_body(
            "/embeddings", host, {"model": SERVED_NAME, "input": [data_uri(img)], "modality": "image"}),
    },
    "clip-retrieval": {
        "search": lambda i, img, host: json_body("/knn-service", host, knn_payload(caption(i))),
    },
}

REQUESTS["clipforge-onnx"] = REQUESTS["clipforge"]  # the same service, its forward passes in onnxruntime
REQUESTS["clipforge-bf16"] = REQUESTS["clipforge"]  # the same service, serve --precision bf16
REQUESTS["infinity-int8"] = REQUESTS["infinity"]  # infinity --dtype int8 (its fastest CPU mode: bf16 is CUDA-only there)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> tuple[int, bool]:
    """One request and its whole response: (status, whether the server keeps the connection)."""
    writer.write(raw)
    status_line = await reader.readline()
    version, status = status_line.split()[:2]
    keep = version == b"HTTP/1.1"
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            keep = value.strip().lower() == b"keep-alive" or (keep and value.strip().lower() != b"close")
    await reader.readexactly(length)
    return int(status), keep


async def drive(port: int, requests: list[bytes], concurrency: int) -> dict:
    """Send every request once from `concurrency` workers: latencies, errors, wall time."""
    latencies: list[float] = []
    errors = 0
    queue = list(reversed(requests))

    async def worker() -> None:
        nonlocal errors
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while queue:
                raw = queue.pop()
                started = time.perf_counter()
                try:
                    if conn is None:
                        conn = await asyncio.open_connection("127.0.0.1", port)
                    status, keep = await _exchange(*conn, raw)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    errors += 1
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    continue
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    errors += 1
                if not keep:
                    conn[1].close()
                    conn = None
        finally:  # also when run_drive's time bound cancels the round
            if conn is not None:
                conn[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "errors": errors, "seconds": time.perf_counter() - started, "requests": len(requests)}


def run_drive(port: int, requests: list[bytes], concurrency: int, timeout: float) -> dict:
    """One bounded round: every request once, or all counted as errors past the time bound."""
    try:
        return asyncio.run(asyncio.wait_for(drive(port, requests, concurrency), timeout))
    except TimeoutError:
        return {"latencies": [], "errors": len(requests), "seconds": timeout, "requests": len(requests),
                "timed_out": True}
