"""No silent data loss in uploads (issue 16 section 2), as the service sees it: multipart bodies the parser would
misread are a 4xx, and an index's own uploads live inside its folder, so a `cp -a` copy is independent.
Crashes between storing an upload and committing it: tests/test_index_uploads.py."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from app_helpers import assert_error
from fastapi.testclient import TestClient
from test_app_support import API_KEY, live_server, shape_image
from test_index_uploads import older_index_with_an_upload

from app.main import create_app
from app.multipart_guard import ascii_compatible
from app.settings import Settings
from index import ImageIndex, NewImage
from model import CLIPInference

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BOUNDARY = "cfupload"


def part(name: str, content: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if filename:
        head += "Content-Type: image/png\r\n"
    return head.encode() + b"\r\n" + content + b"\r\n"


def form(parts: list[bytes], *, closed: bool = True) -> bytes:
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if closed else b"")


def headers(charset: str | None = None, **extra: str) -> dict[str, str]:
    value = f"multipart/form-data; boundary={BOUNDARY}" + (f"; charset={charset}" if charset else "")
    return {"Content-Type": value, **extra}


def three_images() -> list[bytes]:
    return [part("images", shape_image(shape, "blue", size=40), f"{shape}.png") for shape in ("circle", "square", "triangle")]


def test_which_charsets_can_carry_a_form() -> None:
    for charset in ("utf-16", "utf-16-le", "utf-32", "utf-7", "cp037"):
        assert ascii_compatible(charset) is False, charset
    for charset in ("utf-8", "UTF8", "latin-1", "ascii", "cp1252"):
        assert ascii_compatible(charset) is True, charset
    for charset in ("base64", "nonsense-codec"):  # no text codec: app/forms.py holds these to UTF-8
        assert ascii_compatible(charset) is None, charset


# ---------------------------------------------------------------------- a real server over a real index
@pytest.fixture()
def served(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[tuple[httpx.Client, Path]]:
    """`clipforge serve` over a new, empty index whose image root is a separate folder."""
    photos = tmp_path / "photos"
    photos.mkdir()
    ImageIndex.create(tmp_path / "idx", CLIPInference.load(tiny_checkpoint), root=photos).close()
    args = ["--checkpoint", str(tiny_checkpoint), "--index", str(tmp_path / "idx")]
    with live_server({"CLIPFORGE_API_KEYS": API_KEY}, args, tmp_path / "serve.log") as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, tmp_path / "idx"


def _size(client: httpx.Client) -> int:
    return client.get("/info").json()["index"]["size"]


def test_a_utf16_form_is_refused_not_classified_against_the_default_labels(served) -> None:
    client, _ = served
    body = form([part("labels", b"cat"), part("labels", b"dog"), part("image", shape_image(), "a.png")])
    ok = client.post("/classify", content=body, headers=headers())
    assert ok.status_code == 200 and {p["label"] for p in ok.json()["predictions"]} == {"cat", "dog"}, ok.text
    for charset in ("utf-16", "UTF-32"):
        err = assert_error(client.post("/classify", content=body, headers=headers(charset)), 415, "unsupported_charset")
        assert charset in err["message"]
    # the body really written in UTF-16 fares no better, and nothing is stored from it
    wide = form([p.decode("latin-1").encode("utf-16") for p in three_images()])
    assert_error(client.post("/images", content=wide, headers=headers("utf-16", **AUTH)), 415, "unsupported_charset")
    assert _size(client) == 0


def test_a_form_without_its_closing_boundary_adds_nothing(served) -> None:
    client, directory = served
    cut = form(three_images(), closed=False)  # all three parts whole, the final --boundary-- missing
    err = assert_error(client.post("/images", content=cut, headers=headers(**AUTH)), 400, "incomplete_multipart")
    assert "closing boundary" in err["message"]
    torn = form(three_images())[:-200]  # cut inside the last image
    assert_error(client.post("/images", content=torn, headers=headers(**AUTH)), 400, "incomplete_multipart")
    assert_error(client.post("/classify", content=form([part("image", shape_image(), "a.png")], closed=False),
                             headers=headers()), 400, "incomplete_multipart")
    assert _size(client) == 0 and not (directory / "uploads").exists()
    # the whole body, sent in chunks that split the closing delimiter, adds all three
    whole = form(three_images())

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(whole), 7):
            yield whole[i:i + 7]

    r = client.post("/images", content=chunks(), headers=headers(**AUTH))
    assert r.status_code == 200, r.text
    assert [a["filename"] for a in r.json()["added"]] == ["circle.png", "square.png", "triangle.png"]
    assert _size(client) == 3


def test_every_form_route_refuses_a_utf16_or_unclosed_body(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ImageIndex.create(tmp_path / "idx", CLIPInference.load(tiny_checkpoint)).close()
    image = part("image", shape_image(), "a.png")
    routes = {
        "/classify": [part("labels", b"cat"), image], "/similarity": [part("texts", b"cat"), image],
        "/search/image": [image], "/embed/image": [part("images", shape_image(), "a.png")],
        "/images": [part("images", shape_image(), "a.png"), part("captions", b"a red circle")],
    }
    settings = Settings(checkpoint=tiny_checkpoint, index=tmp_path / "idx", api_keys=[API_KEY])
    with TestClient(create_app(settings)) as c:
        for route, parts in routes.items():
            for charset in ("utf-16", "utf-32-be", "cp037"):
                r = c.post(route, content=form(parts), headers=headers(charset, **AUTH))
                assert_error(r, 415, "unsupported_charset")
            assert_error(c.post(route, content=form(parts, closed=False), headers=headers(**AUTH)),
                         400, "incomplete_multipart")
            assert c.post(route, content=form(parts), headers=headers("utf-8", **AUTH)).status_code == 200, route
        assert c.get("/info").json()["index"]["size"] == 1


# ---------------------------------------------------------------------- uploads inside the index folder
def test_a_copied_index_is_independent_of_the_original(tiny_checkpoint: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "own.png").write_bytes(shape_image("circle", "red", size=40))
    original = tmp_path / "idx"
    with ImageIndex.create(original, CLIPInference.load(tiny_checkpoint), root=photos) as idx:
        idx.add_files(CLIPInference.load(tiny_checkpoint), [photos / "own.png"])
    settings = Settings(checkpoint=tiny_checkpoint, index=original, api_keys=[API_KEY])
    with TestClient(create_app(settings)) as c:
        r = c.post("/images", files={"images": ("up.png", shape_image("square", "blue", size=40))}, headers=AUTH)
        assert r.status_code == 200, r.text
        upload_id = r.json()["added"][0]["id"]
    uploaded = list((original / "uploads").iterdir())
    assert len(uploaded) == 1 and not (photos / "uploads").exists()  # in the index folder, not the root

    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(original), str(copy)], check=True)
    settings = Settings(checkpoint=tiny_checkpoint, index=copy, api_keys=[API_KEY])
    with TestClient(create_app(settings)) as c:
        served = c.get(f"/images/{upload_id}")
        assert served.status_code == 200 and served.content == uploaded[0].read_bytes()
        assert c.delete(f"/images/{upload_id}", headers=AUTH).status_code == 200
        r = c.post("/images", files={"images": ("more.png", shape_image("triangle", "green", size=40))},
                   headers=AUTH)
        assert r.status_code == 200, r.text
    assert not (copy / "uploads" / uploaded[0].name).exists() and len(list((copy / "uploads").iterdir())) == 1
    # the original still holds and serves its upload, and nothing the copy wrote
    assert [p.name for p in (original / "uploads").iterdir()] == [uploaded[0].name]
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, index=original))) as c:
        assert c.get(f"/images/{upload_id}").status_code == 200 and c.get("/info").json()["index"]["size"] == 2


def test_an_older_index_serves_its_uploads_and_its_first_write_moves_them_in(tiny_checkpoint: Path,
                                                                            tmp_path: Path) -> None:
    clip = CLIPInference.load(tiny_checkpoint)
    directory, stored, image_id, content = older_index_with_an_upload(clip, tmp_path)
    photos = stored.parent.parent
    settings = Settings(checkpoint=tiny_checkpoint, index=directory, api_keys=[API_KEY])
    with TestClient(create_app(settings)) as c:
        assert c.get(f"/images/{image_id}").content == content  # read from ROOT/uploads, as it was stored
        assert not (directory / "uploads").exists()  # opening and reading change nothing
        r = c.post("/images", files={"images": ("new.png", shape_image("circle", size=40))}, headers=AUTH)
        assert r.status_code == 200, r.text
        new_id = r.json()["added"][0]["id"]
        assert c.get(f"/images/{image_id}").content == content and c.get(f"/images/{new_id}").status_code == 200
    assert len(list((directory / "uploads").iterdir())) == 2  # both in the index folder now
    assert [p.name for p in (photos / "uploads").iterdir()] == [stored.name]  # the original left in place

    # a new index over that root: the old uploads folder would read as its own, so it is copied in or refused
    new = ImageIndex.create(tmp_path / "new", clip, root=photos)
    old_upload = stored
    report = new.add_files(clip, [old_upload])
    assert report.added == [] and "where older indexes kept their uploads" in report.failed[0][1]
    copied = new.add_files(clip, [old_upload], copy_outside_root=True)
    assert new.resolve_path(copied.added[0]).parent == (tmp_path / "new" / "uploads").resolve()
    vector = np.eye(1, clip.dim, dtype=np.float32)
    new.add_embeddings(vector * -1, [NewImage("a/b.png", "e" * 64, 1, 1)])  # other root paths are unaffected
    assert new.resolve_path(new.records()[-1].id) == (photos / "a" / "b.png").resolve()
    new.close()
    shutil.rmtree(tmp_path / "new")


