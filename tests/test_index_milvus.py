"""The Milvus index store against a real engine (Milvus Lite in this process, through pymilvus's MilvusClient):
locations, the checkpoint binding, de-duplicated adds, removal, exact search against FAISS, filters, stored
image bytes, and the `clipforge index` commands on a Milvus location."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipforge_cli
from index import (
    ImageIndex,
    IndexExistsError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStoreError,
    NewImage,
)
from index.locations import MilvusLocation, open_index, resolve_location
from index.search_filter import SearchFilter

pytest.importorskip("pymilvus", reason="the Milvus store needs pymilvus: pip install 'clipforge[milvus]'")
pytest.importorskip("milvus_lite", reason="these tests run Milvus Lite: pip install 'clipforge[milvus]'")

from index.milvus import MilvusImageIndex, content_id

DIM = 16
MODEL = "f" * 64


def png(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sha(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture()
def lite(tmp_path: Path) -> str:
    return f"milvus-lite:{tmp_path / 'milvus.db'}"


def test_locations_parse_with_one_line_errors(tmp_path: Path) -> None:
    server = resolve_location("milvus://milvus.internal:19530/photos")
    assert server == MilvusLocation("http://milvus.internal:19530", "photos", "milvus://milvus.internal:19530/photos", False)
    assert resolve_location("milvus+https://[::1]:443/p_2").uri == "https://[::1]:443"
    assert resolve_location(Path("milvus://h:19530/c")).uri == "http://h:19530"  # Path folds the two slashes
    lite = resolve_location(f"milvus-lite:{tmp_path}/m.db/photos")
    assert lite.lite and lite.uri == str(tmp_path / "m.db") and lite.collection == "photos"
    assert resolve_location(tmp_path / "faiss") == tmp_path / "faiss"
    pointer = tmp_path / "photos.milvus"
    pointer.write_text("# the shared collection\nmilvus://10.0.0.5:19530/photos\n")
    assert resolve_location(pointer).collection == "photos"
    for bad, words in [
        ("milvus://h:19530", "give the collection"), ("milvus://h/photos", "is not HOST:PORT"),
        ("milvus://h:99999/photos", "is not HOST:PORT"), ("milvus://h:1/bad-name", "collection name"),
        ("milvus://h:1/c?x=1", "takes no query"), ("milvus-lite:/tmp/data/photos", "ends in .db"),
        ("milvus:/h:1/c", "two slashes"),
    ]:
        with pytest.raises(IndexStoreError) as err:
            resolve_location(bad)
        assert words in str(err.value) and "\n" not in str(err.value), (bad, err.value)
    pointer.write_text("/some/folder\n")
    with pytest.raises(IndexStoreError, match="not a Milvus location"):
        resolve_location(pointer)


def test_add_search_dedupe_replace_remove(lite: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng, 40)
    images = [NewImage(f"{'a' if i < 20 else 'b'}/{i}.png", sha(i), 10 + i, 20, f"image {i}") for i in range(40)]
    with MilvusImageIndex.create(lite + "/photos", MODEL, dim=DIM, root=tmp_path) as idx:
        report = idx.add_embeddings(vectors * 3.0, images)  # not unit length: the store normalises
        assert report.added == [content_id(sha(i)) for i in range(40)] and not report.failed
        assert len(idx) == 40
        hits = idx.search_by_vector(vectors[:3], 5)
        assert [h[0].path for h in hits] == ["a/0.png", "a/1.png", "a/2.png"]
        assert all(abs(h[0].score - 1.0) < 1e-4 for h in hits)
        assert all(h[i].score >= h[i + 1].score for h in hits for i in range(4))
        assert hits[0][0].caption == "image 0" and (hits[0][0].width, hits[0][0].height) == (10, 20)
        assert all(hit.score >= 0.3 for hit in idx.search_by_vector(vectors[0], 40, min_score=0.3)[0])

        again = idx.add_embeddings(vectors[:2], images[:2])
        assert again.added == [] and again.duplicates == [("a/0.png", content_id(sha(0))), ("a/1.png", content_id(sha(1)))]
        changed = idx.add_embeddings(vectors[5:6], [NewImage("a/3.png", sha(100), 1, 1)])  # new content at a path
        assert changed.added == [content_id(sha(100))] and changed.replaced == [content_id(sha(3))]
        assert len(idx) == 40 and idx.get(content_id(sha(3))) is None

        assert idx.remove([content_id(sha(4)), "a/5.png"]) == 2
        assert idx.remove(["b"]) == 20  # a folder
        assert idx.remove([str(tmp_path / "a" / "6.png"), 12345]) == 1  # absolute inside the root; unknown id
        assert len(idx) == 17 and idx.verify()["count"] == 17
        all_ids = [r.id for r in idx.records(0, 100)]
        assert all_ids == sorted(all_ids) and len(all_ids) == 17
        assert [r.id for r in idx.records(2, 3)] == all_ids[2:5]
        with pytest.raises(IndexStoreError, match="shape"):
            idx.search_by_vector(np.zeros((1, DIM + 1)), 3)
        with pytest.raises(IndexStoreError, match="positive integer"):
            idx.search_by_vector(vectors[0], 0)


def test_checkpoint_binding_and_existence(lite: str) -> None:
    with pytest.raises(IndexNotFoundError, match="no clipforge index there"):
        open_index(lite + "/photos")
    MilvusImageIndex.create(lite + "/photos", MODEL, dim=DIM).close()
    with pytest.raises(IndexExistsError, match="already holds an index"):
        MilvusImageIndex.create(lite + "/photos", MODEL, dim=DIM)
    with pytest.raises(IndexMismatchError) as err:
        open_index(lite + "/photos", model_id="0" * 64)
    assert "was built with checkpoint ffffffffffff, not 000000000000" in str(err.value) and "\n" not in str(err.value)
    with open_index(lite + "/photos", model_id=MODEL) as idx:
        assert isinstance(idx, MilvusImageIndex)
        with pytest.raises(IndexMismatchError):
            idx.check_model("1" * 64)
        info = idx.info()
        assert info["checkpoint_hash"] == MODEL and info["count"] == 0 and info["dim"] == DIM
    with pytest.raises(IndexStoreError, match="builds auto, flat, hnsw"):
        MilvusImageIndex.create(lite + "/other", MODEL, dim=DIM, index_type="ivfpq")
    with pytest.raises(IndexStoreError, match="not --nlist"):
        MilvusImageIndex.create(lite + "/other", MODEL, dim=DIM, params={"nlist": 4})


def test_exact_search_matches_faiss(lite: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vectors, queries = unit(rng, 300), unit(rng, 8)
    images = [NewImage(f"{i}.png", sha(i), 1, 1) for i in range(300)]
    faiss_index = ImageIndex.create(tmp_path / "faiss", MODEL, dim=DIM, index_type="flat")
    faiss_index.add_embeddings(vectors, images)
    with MilvusImageIndex.create(lite + "/flat", MODEL, dim=DIM, index_type="flat") as milvus:
        milvus.add_embeddings(vectors, images)
        for want, got in zip(faiss_index.search_by_vector(queries, 10), milvus.search_by_vector(queries, 10)):
            assert [h.path for h in got] == [h.path for h in want]
            assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    faiss_index.close()


def test_filtered_search(lite: str) -> None:
    rng = np.random.default_rng(2)
    vectors = unit(rng, 6)
    images = [NewImage("2024/a_1.png", sha(0), 1, 1, "a dog, 50% off"), NewImage("2024/ab1.png", sha(1), 30, 20, "a dog"),
              NewImage("2025/x.png", sha(2), 1, 1, 'a "quoted" cat'), NewImage("2025/y.png", sha(3), 1, 1, None),
              NewImage("2024_/z.png", sha(4), 1, 1, "a\\b"), NewImage("other.png", sha(5), 1, 1, "DOG")]
    with MilvusImageIndex.create(lite + "/filtered", MODEL, dim=DIM) as idx:
        idx.add_embeddings(vectors, images)

        def paths(**conditions: str | int) -> set[str]:
            return {h.path for h in idx.search_by_vector(vectors[0], 6, filter=SearchFilter(**conditions))[0]}

        assert paths(path_prefix="2024/") == {"2024/a_1.png", "2024/ab1.png"}
        assert paths(path_prefix="2024/a_") == {"2024/a_1.png"}  # _ and % are literal
        assert paths(path_prefix="2024_") == {"2024_/z.png"}
        assert paths(caption_contains="dog") == {"2024/a_1.png", "2024/ab1.png"}  # case-sensitive
        assert paths(caption_contains="50% off") == {"2024/a_1.png"}
        assert paths(caption_contains='"quoted"') == {"2025/x.png"}
        assert paths(caption_contains="\\") == {"2024_/z.png"}
        assert paths(path_prefix="2025/", caption_contains="cat") == {"2025/x.png"}
        assert len(paths(added_after="2000-01-01")) == 6 and paths(added_after="2999-01-01") == set()
        assert len(paths(added_before="2999-01-01T00:00:00Z")) == 6 and paths(added_before="2000-01-01") == set()
        assert len(idx.search_by_vector(vectors[0], 1, filter=SearchFilter(path_prefix="2024/"))[0]) == 1
        assert paths(min_width=30) == {"2024/ab1.png"} and paths(min_height=21) == set()
        assert paths(min_width=2, min_height=20) == {"2024/ab1.png"}
    with pytest.raises(IndexStoreError, match="not a UTC time"):
        SearchFilter(added_after="yesterday")
    with pytest.raises(IndexStoreError, match="is not before"):
        SearchFilter(added_after="2025-01-02", added_before="2025-01-01")


def test_image_bytes_are_served_from_the_collection(lite: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    from model import CLIPInference

    clip = CLIPInference.load(tiny_checkpoint)
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        (root / f"p{i}.png").write_bytes(png(i))
    (root / "dup.png").write_bytes(png(0))
    (root / "big.png").write_bytes(png(9, size=300))
    idx = MilvusImageIndex.create(lite + "/served", clip, root=root, max_image_bytes=60_000, cache_dir=tmp_path / "cache")
    report = idx.add_files(clip, sorted(root.glob("*.png")), workers=0)
    assert len(report.added) == 3 and [n for n, _ in report.duplicates] == [str(root / "p0.png")]
    assert [(Path(n).name, "keeps images up to 60,000" in why) for n, why in report.failed] == [("big.png", True)]
    uploaded = idx.add_bytes(clip, [("new.png", png(5), "an upload"), ("again.png", png(1), None)])
    new_id = uploaded.added[0]
    assert uploaded.duplicates == [("again.png", content_id(hashlib.sha256(png(1)).hexdigest()))]
    assert idx.get(new_id).path.startswith("uploads/") and idx.get(new_id).caption == "an upload"
    for f in root.iterdir():  # the files themselves are gone: the collection still serves every image
        f.unlink()
    for image_id, content in [(content_id(hashlib.sha256(png(2)).hexdigest()), png(2)), (new_id, png(5))]:
        path = idx.resolve_path(image_id)
        assert path.read_bytes() == content and path.suffix == ".png" and path.parent == tmp_path / "cache"
    hits = idx.search_image(clip, png(5), k=1)
    assert hits[0].id == new_id and hits[0].score > 0.999
    assert idx.verify() == {"count": 4, "stored_images": 4, "chunks": 4}
    assert idx.remove([new_id]) == 1 and idx.get(new_id) is None
    with pytest.raises(IndexStoreError, match="no image with id"):
        idx.resolve_path(new_id)
    idx.close()


def clipforge_cli_clip(checkpoint: Path):  # -> CLIPInference, imported late like the CLI does
    from model import CLIPInference

    return CLIPInference.load(checkpoint)


def test_index_commands_on_a_milvus_location(lite: str, tmp_path: Path, tiny_checkpoint: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i in range(4):
        (photos / f"p{i}.png").write_bytes(png(20 + i))
    (photos / "sub" / "s.png").write_bytes(png(30))
    location = lite + "/cli"

    def run(*argv: str) -> tuple[int, str, str]:
        code = clipforge_cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("index", "build", "--checkpoint", str(tiny_checkpoint), "--images", str(photos),
                         "--out", location, "--quiet", "--workers", "0")
    assert code == 0 and "added 5 image(s)" in out, (out, err)
    code, _, err = run("index", "build", "--checkpoint", str(tiny_checkpoint), "--images", str(photos), "--out", location)
    assert code == 2 and "already holds an index" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run("index", "info", location, "--json", "--verify")
    info = json.loads(out)
    assert code == 0 and info["count"] == 5 and info["store"] == "milvus" and info["verified"]["stored_images"] == 5
    code, out, _ = run("index", "info", location)
    assert code == 0 and "Milvus hnsw index" in out
    code, out, _ = run("index", "search", location, "anything", "-k", "3", "--json")
    assert code == 0 and len(json.loads(out)) == 3
    code, out, _ = run("index", "search", location, "anything", "--path-prefix", "sub/", "--json")
    assert code == 0 and [h["path"] for h in json.loads(out)] == ["sub/s.png"]
    (photos / "p9.png").write_bytes(png(29))
    code, out, _ = run("index", "add", location, str(photos / "p9.png"), str(photos / "p0.png"), "--quiet", "--workers", "0")
    assert code == 0 and "added 1 image(s)" in out and "1 duplicate(s)" in out
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(31))
    code, _, err = run("index", "add", location, str(outside), "--quiet", "--workers", "0")
    assert code == 1 and "outside the index root" in err
    code, out, _ = run("index", "add", location, str(outside), "--copy", "--quiet", "--workers", "0")
    assert code == 0 and "added 1 image(s)" in out
    outside.unlink()  # its bytes are in the collection
    with open_index(location) as idx:
        copied = idx.search_image(clipforge_cli_clip(tiny_checkpoint), png(31), k=1)[0]
        assert copied.path.startswith("uploads/") and idx.resolve_path(copied.id).read_bytes() == png(31)
        assert idx.remove([copied.id]) == 1
    code, out, _ = run("index", "remove", location, "sub")
    assert code == 0 and "removed 1 image(s)" in out and "5 image(s)" in out
    code, _, err = run("index", "rebuild", location, "--type", "flat")
    assert code == 2 and "cannot change a built index" in err
    code, _, err = run("index", "search", str(tmp_path / "nope"), "x", "--path-prefix", "a")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = run("index", "search", location, "x", "--added-after", "last week")
    assert code == 2 and "not a UTC time" in err and len(err.strip().splitlines()) == 1


def test_unreachable_server_and_bad_locations_are_one_line(tmp_path: Path, tiny_checkpoint: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(png(1))
    for argv in (["index", "info", f"milvus://127.0.0.1:{port}/photos"],
                 ["index", "search", f"milvus://127.0.0.1:{port}/photos", "x", "--checkpoint", str(tiny_checkpoint)],
                 ["index", "build", "--checkpoint", str(tiny_checkpoint), "--images", str(tmp_path / "photos"),
                  "--out", f"milvus://127.0.0.1:{port}/photos"],
                 ["index", "info", "milvus://127.0.0.1/photos"], ["index", "info", "milvus-lite:nope/photos"],
                 ["index", "info", f"milvus-lite:{tmp_path / 'missing' / 'm.db'}/photos"]):
        code = clipforge_cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert clipforge_cli.main(["index", "info", f"milvus://127.0.0.1:{port}/photos"]) == 2
    assert "server unavailable" in capsys.readouterr().err


def test_a_milvus_lite_folder_held_by_another_process_is_one_line(lite: str, capsys: pytest.CaptureFixture) -> None:
    import subprocess
    import sys

    MilvusImageIndex.create(lite + "/held", MODEL, dim=DIM).close()
    script = ("import sys; from index.locations import open_index; "
              f"idx = open_index({lite + '/held'!r}); print('open', flush=True); sys.stdin.read()")
    holder = subprocess.Popen(  # another process with the folder open, as a second service would be
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(clipforge_cli.__file__).parent)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert clipforge_cli.main(["index", "info", lite + "/held"]) == 2
        err = capsys.readouterr().err
        assert "another process may hold it" in err and "milvus-lite server --data-dir" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
