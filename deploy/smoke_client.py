"""Calls a running clipforge service the way a user would, and fails loudly on any surprise.

Used by deploy/compose-smoke.sh against the containerised api, and by the tests against a
local `clipforge serve`. Each check prints one line; the exit status is 0 only when all pass.

Usage: python deploy/smoke_client.py --url http://127.0.0.1:PORT [--api-key KEY] [--expect-images]
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Callable
from typing import Any

import httpx
from PIL import Image, ImageDraw


class SmokeFailure(Exception):
    """A response that a working deployment would not give."""


def red_circle_png(size: int = 64) -> bytes:
    """A red circle on white, like the demo's shapes, as PNG bytes."""
    img = Image.new("RGB", (size, size), (245, 245, 245))
    ImageDraw.Draw(img).ellipse((size * 0.25, size * 0.25, size * 0.75, size * 0.75), fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _expect(response: httpx.Response, status: int) -> Any:
    if response.status_code != status:
        raise SmokeFailure(f"{response.request.method} {response.request.url.path}: expected {status}, "
                           f"got {response.status_code}: {response.text[:300]}")
    return response.json() if response.headers.get("content-type", "").startswith("application/json") else response


def check_ready(client: httpx.Client, api_key: str | None, expect_images: bool) -> str:
    body = _expect(client.get("/readyz"), 200)
    info = _expect(client.get("/info"), 200)
    if not info.get("model") or body is None:
        raise SmokeFailure(f"/info names no model: {info}")
    return f"ready, model {info['model'][:12]}, dim {info.get('dim')}"


def check_classify(client: httpx.Client, api_key: str | None, expect_images: bool) -> str:
    png = red_circle_png()
    labels = ["red circle", "blue square", "green triangle"]
    body = _expect(client.post("/classify", files={"image": ("circle.png", png, "image/png")},
                               data={"labels": labels}), 200)
    preds = body["predictions"]
    if sorted(p["label"] for p in preds) != sorted(labels):
        raise SmokeFailure(f"/classify answered labels {[p['label'] for p in preds]}, sent {labels}")
    probs = [p["probability"] for p in preds]
    if not math.isclose(sum(probs), 1.0, abs_tol=1e-3) or probs != sorted(probs, reverse=True):
        raise SmokeFailure(f"/classify probabilities must sum to 1 and be sorted, got {probs}")
    default = _expect(client.post("/classify", files={"image": ("circle.png", png, "image/png")}), 200)
    if not default["predictions"]:
        raise SmokeFailure("/classify without labels returned no predictions (no default labels in the checkpoint?)")
    return f"classify: top {preds[0]['label']!r} p={preds[0]['probability']:.3f}; default labels top {default['predictions'][0]['label']!r}"


def check_search(client: httpx.Client, api_key: str | None, expect_images: bool) -> str:
    body = _expect(client.get("/search", params={"q": "a red circle", "k": 5}), 200)
    results = body["results"]
    if expect_images and not results:
        raise SmokeFailure("/search returned no results from an index that should hold the demo images")
    for hit in results:
        image = client.get(hit["url"])
        _expect(image, 200)
        if not image.headers.get("content-type", "").startswith("image/") or not image.content:
            raise SmokeFailure(f"{hit['url']} did not return an image")
    scores = [hit["score"] for hit in results]
    if scores != sorted(scores, reverse=True):
        raise SmokeFailure(f"/search scores are not sorted: {scores}")
    top = f"top {results[0].get('caption') or results[0].get('path')!r} score {scores[0]:.3f}" if results else "no hits"
    return f"search: {len(results)} results, {top}, images served"


def check_writes(client: httpx.Client, api_key: str | None, expect_images: bool) -> str:
    png = red_circle_png(80)
    files = {"images": ("smoke.png", png, "image/png")}
    if api_key is None:  # 403 when the service has no keys at all, 401 when it has some
        refused = client.post("/images", files=files)
        if refused.status_code not in (401, 403):
            raise SmokeFailure(f"POST /images without a key: expected 401 or 403, got {refused.status_code}")
        return f"writes: refused without a key ({refused.status_code}); no key given to test an authorised write"
    _expect(client.post("/images", files=files), 401)
    _expect(client.post("/images", files=files, headers={"Authorization": "Bearer wrong-key-123"}), 403)
    headers = {"Authorization": f"Bearer {api_key}"}
    added = _expect(client.post("/images", files=files, headers=headers), 200)
    ids = [item["id"] for item in added["added"]] + [item["id"] for item in added["duplicates"]]
    if len(ids) != 1:
        raise SmokeFailure(f"POST /images with a valid key did not add the image: {added}")
    _expect(client.get(f"/images/{ids[0]}"), 200)
    deleted = _expect(client.delete(f"/images/{ids[0]}", headers=headers), 200)
    _expect(client.get(f"/images/{ids[0]}"), 404)
    return f"writes: 401 without key, 403 with a wrong one, add + delete with the key (index size {deleted['size']})"


CHECKS: list[Callable[[httpx.Client, str | None, bool], str]] = [check_ready, check_classify, check_search, check_writes]


def run_checks(url: str, api_key: str | None, expect_images: bool, timeout_s: float = 60.0) -> int:
    """Run every check; print one line each; return the number that failed."""
    failed = 0
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for check in CHECKS:
            try:
                print(f"ok   {check.__name__}: {check(client, api_key, expect_images)}", flush=True)
            except (SmokeFailure, httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
                failed += 1
                print(f"FAIL {check.__name__}: {type(exc).__name__}: {exc}", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="a key the service accepts, to test writes")
    parser.add_argument("--expect-images", action="store_true", help="fail when /search finds nothing")
    args = parser.parse_args(argv)
    failed = run_checks(args.url.rstrip("/"), args.api_key, args.expect_images)
    print(f"smoke client: {len(CHECKS) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
