"""Calls a running clipforge service the way a user would, and fails loudly on any surprise.

Used by deploy/compose-smoke.sh against the containerised api, and by the tests against a
local `clipforge serve`. Each check prints one line; the exit status is 0 only when all pass.

Usage: python deploy/smoke_client.py --url http://127.0.0.1:PORT [--api-key KEY] [--expect-images]

With --expect-preset / --expect-step / --expect-index-size / --expect-path-regex it checks,
instead of the demo's checks, that the service serves a model trained from a data set of one's
own and an index built from its images (the README's train-profile commands), searching for
--query. With --write-datasets DIR it only writes the small data sets that those commands
train on (Flickr30k's results.csv and LLaVA-Pretrain's JSON, over the same kind of coloured
shapes), then exits.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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


def check_search(client: httpx.Client, api_key: str | None, expect_images: bool, query: str = "a red circle") -> str:
    body = _expect(client.get("/search", params={"q": query, "k": 5}), 200)
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


@dataclass(frozen=True)
class Served:
    """What /info and /search must show when the service runs a model and index of one's own."""

    preset: str | None = None
    step: int | None = None
    index_size: int | None = None
    path_regex: str | None = None
    query: str = "red"

    @property
    def wanted(self) -> bool:
        return any(v is not None for v in (self.preset, self.step, self.index_size, self.path_regex))


def check_served(client: httpx.Client, served: Served) -> str:
    """/info names the expected preset, training step and index size; /search hits are files of that index."""
    info = _expect(client.get("/info"), 200)
    if served.preset is not None and info.get("preset") != served.preset:
        raise SmokeFailure(f"/info reports preset {info.get('preset')!r}, expected {served.preset!r}")
    if served.step is not None and info.get("step") != served.step:
        raise SmokeFailure(f"/info reports a checkpoint of step {info.get('step')!r}, expected {served.step}")
    size = (info.get("index") or {}).get("size")
    if served.index_size is not None and size != served.index_size:
        raise SmokeFailure(f"/info reports an index of {size!r} images, expected {served.index_size}")
    body = _expect(client.get("/search", params={"q": served.query, "k": 5}), 200)
    results = body["results"]
    if not results:
        raise SmokeFailure(f"/search?q={served.query} returned no results")
    if body.get("model") != info.get("model"):
        raise SmokeFailure(f"/search answered with model {body.get('model')}, /info names {info.get('model')}")
    for hit in results:
        if served.path_regex is not None and not re.fullmatch(served.path_regex, hit["path"]):
            raise SmokeFailure(f"/search hit {hit['path']!r} is not an image of the expected index ({served.path_regex})")
        image = client.get(hit["url"])
        _expect(image, 200)
        if not image.headers.get("content-type", "").startswith("image/") or not image.content:
            raise SmokeFailure(f"{hit['url']} did not return an image")
    return (f"served: preset {info.get('preset')}, step {info.get('step')}, model {str(info.get('model'))[:12]}, "
            f"index of {size} images; /search?q={served.query}: {len(results)} hits, top {results[0]['path']!r}")


def run_checks(url: str, api_key: str | None, expect_images: bool, timeout_s: float = 60.0,
               served: Served | None = None) -> int:
    """Run every check, print one line each, and return the number that failed.

    Given what must be served (a Served with expectations), the checks are check_ready and
    check_served instead of the demo's.
    """
    checks: list[tuple[str, Callable[[httpx.Client], str]]]
    if served is not None and served.wanted:
        checks = [("check_ready", lambda c: check_ready(c, api_key, expect_images)),
                  ("check_served", lambda c: check_served(c, served))]
    else:
        checks = [(check.__name__, lambda c, f=check: f(c, api_key, expect_images)) for check in CHECKS]
    failed = 0
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for name, check in checks:
            try:
                print(f"ok   {name}: {check(client)}", flush=True)
            except (SmokeFailure, httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
                failed += 1
                print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    print(f"smoke client: {len(checks) - failed} passed, {failed} failed", flush=True)
    return failed


# ------------------------------------------------------------------------- data sets for the train profile
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")


def _shape_jpeg(colour: tuple[int, int, int], shape: str, size: int, offset: int) -> bytes:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    lo, hi = size * 0.2 + offset, size * 0.8 - offset
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=colour)
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=colour)
    else:
        draw.polygon([((lo + hi) / 2, lo), (hi, hi), (lo, hi)], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_datasets(root: Path, n: int = 40, size: int = 64) -> dict[str, Path]:
    """Small caption data sets in the layouts the README's train commands read, under root.

    flickr30k/results.csv (`image_name| comment_number| comment`, three captions an image) with
    flickr30k/images/NNN.jpg, and llava/blip_laion_cc_sbu_558k.json (LLaVA-Pretrain records)
    with llava/images/00000/NNN.jpg: n coloured shapes each. Files and folders are world-readable
    (the containers run as uid 10001). Returns the two caption files.
    """
    flickr, llava = root / "flickr30k", root / "llava"
    (flickr / "images").mkdir(parents=True, exist_ok=True)
    (llava / "images" / "00000").mkdir(parents=True, exist_ok=True)
    rows = ["image_name| comment_number| comment"]
    records = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        jpeg = _shape_jpeg(COLOURS[colour], shape, size, offset=(i * 3) % 7)
        name = f"{i:03d}.jpg"
        (flickr / "images" / name).write_bytes(jpeg)
        (llava / "images" / "00000" / name).write_bytes(jpeg)
        captions = [f"a {colour} {shape}", f"a {shape} coloured {colour}", f"one {colour} {shape} on a white background"]
        rows += [f"{name}| {j}| {c}" for j, c in enumerate(captions)]
        records.append({"id": f"{i:09d}", "image": f"00000/{name}", "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": captions[0]}]})
    (flickr / "results.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (llava / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records), encoding="utf-8")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return {"flickr30k": flickr / "results.csv", "llava": llava / "blip_laion_cc_sbu_558k.json"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="base URL of the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="a key the service accepts, to test writes")
    parser.add_argument("--expect-images", action="store_true", help="fail when /search finds nothing")
    parser.add_argument("--expect-preset", help="/info must report this model preset")
    parser.add_argument("--expect-step", type=int, help="/info must report a checkpoint of this training step")
    parser.add_argument("--expect-index-size", type=int, help="/info must report an index of this many images")
    parser.add_argument("--expect-path-regex", help="every /search hit's path must match this regular expression")
    parser.add_argument("--query", default="red", help="the /search query of the --expect-* checks (default: red)")
    parser.add_argument("--write-datasets", type=Path, metavar="DIR",
                        help="only write the train profile's small data sets into DIR, then exit")
    args = parser.parse_args(argv)
    if args.write_datasets is not None:
        for kind, path in write_datasets(args.write_datasets).items():
            print(f"{kind}: {path}", flush=True)
        return 0
    if not args.url:
        parser.error("--url is required")
    served = Served(args.expect_preset, args.expect_step, args.expect_index_size, args.expect_path_regex, args.query)
    failed = run_checks(args.url.rstrip("/"), args.api_key, args.expect_images, served=served)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
