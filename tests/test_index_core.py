"""ImageIndex through Python: add, search, remove, duplicates, bad files, every index type, safety checks."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index import (
    ImageIndex,
    IndexExistsError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStoreError,
    NewImage,
    PathOutsideRootError,
    backends,
)
from model import CLIPInference


def png_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_images(folder: Path, n: int, start: int = 0, sub: str = "") -> list[Path]:
    (folder / sub).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / sub / f"img{i:03d}.png"
        p.write_bytes(png_bytes(i))
        paths.append(p)
    return paths


def unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fake_images(n: int, start: int = 0) -> list[NewImage]:
    return [NewImage(f"v/{i}.png", f"{i:064x}", 10, 10, f"caption {i}") for i in range(start, start + n)]


@pytest.fixture(scope="module")
def clip(tiny_checkpoint: Path) -> CLIPInference:
    return CLIPInference.load(tiny_checkpoint)


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    write_images(root, 6)
    write_images(root, 3, start=6, sub="nested")
    return root


def test_add_search_get_info(tmp_path: Path, clip: CLIPInference, images: Path) -> None:
    idx = ImageIndex.create(tmp_path / "idx", clip, root=images, index_type="flat")
    files = sorted(images.rglob("*.png"))
    report = idx.add_files(clip, files, captions=[f"picture {i}" for i in range(len(files))])
    assert len(report.added) == len(files) == len(idx) and not report.failed and not report.duplicates
    # an image is its own nearest neighbour, with cosine similarity 1
    hits = idx.search_image(clip, files[4], k=3)
    assert hits[0].path == files[4].relative_to(images).as_posix() and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].caption == "picture 4" and (hits[0].width, hits[0].height) == (40, 32)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(idx.search_text(clip, "a red circle", k=50)) == len(files)
    rec = idx.get(hits[0].id)
    assert rec is not None and rec.path == hits[0].path and len(rec.sha256) == 64
    assert idx.get(10_000) is None
    assert idx.resolve_path(hits[0].id) == files[4].resolve()
    info = idx.info()
    assert info["count"] == len(files) and info["index_type"] == "flat" and info["dim"] == clip.dim
    assert info["checkpoint_hash"] == clip.model_id and info["metric"] == "inner_product"
    assert info["created"] and info["updated"] >= info["created"]
    assert idx.verify()["count"] == len(files)
    # batch queries and min_score
    q = clip.embed_images(files[:2])
    batched = idx.search_by_vector(q, k=2)
    assert [r[0].path for r in batched] == [f.relative_to(images).as_posix() for f in files[:2]]
    assert all(h.score >= 0.999 for h in idx.search_by_vector(q, k=5, min_score=0.999)[0])
    # a second handle sees the same data, and reopening keeps ids and metadata
    again = ImageIndex.open(tmp_path / "idx", model_id=clip.model_id)
    assert again.search_by_vector(q, k=1)[0][0].id == batched[0][0].id
    assert again.records(0, 100)[0].id == min(report.added)


def test_duplicates_and_changed_content(tmp_path: Path, clip: CLIPInference, images: Path) -> None:
    idx = ImageIndex.create(tmp_path / "idx", clip, root=images)
    files = sorted(images.glob("*.png"))
    first = idx.add_files(clip, files[:3] + [files[0]])  # the same file twice in one call
    assert len(first.added) == 3 and len(first.duplicates) == 1 and first.duplicates[0][1] == first.added[0]
    copy = images / "copy_of_0.png"
    copy.write_bytes(files[0].read_bytes())  # same content under another name
    second = idx.add_files(clip, files[:4] + [copy])
    assert len(second.added) == 1 and {i for _, i in second.duplicates} == set(first.added)
    assert len(idx) == 4
    files[1].write_bytes(png_bytes(999))  # the file changed on disk: its entry is replaced
    third = idx.add_files(clip, [files[1]])
    assert len(third.added) == 1 and third.replaced == [first.added[1]]
    assert len(idx) == 4 and idx.get(first.added[1]) is None
    idx.verify()


def test_corrupt_oversized_and_missing_files_are_skipped_and_listed(tmp_path: Path, clip: CLIPInference, images: Path) -> None:
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (images / "truncated.png").write_bytes(png_bytes(50, (64, 64))[:200])
    Image.new("RGB", (120, 100)).save(images / "huge.png")  # over the pixel limit set below
    (images / "big.bmp").write_bytes(b"BM" + b"\0" * 300_000)  # over the byte limit
    small_limit = CLIPInference(clip.model, clip.tokenizer, clip.meta, max_pixels=10_000)
    idx = ImageIndex.create(tmp_path / "idx", clip, root=images)
    good = sorted(images.glob("img*.png"))
    bad = [images / n for n in ("corrupt.jpg", "truncated.png", "huge.png", "big.bmp", "missing.png")]
    report = idx.add_files(small_limit, good + bad, max_bytes=200_000)
    assert len(report.added) == len(good)
    reasons = dict(report.failed)
    assert set(reasons) == {str(p) for p in bad}
    assert "exceeds the limit" in reasons[str(images / "huge.png")]
    assert "bytes exceeds" in reasons[str(images / "big.bmp")]
    assert "no such file" in reasons[str(images / "missing.png")]
    assert "BytesIO" not in reasons[str(images / "corrupt.jpg")]
    idx.verify()


def test_remove_by_id_path_and_folder(tmp_path: Path, clip: CLIPInference, images: Path) -> None:
    idx = ImageIndex.create(tmp_path / "idx", clip, root=images)
    report = idx.add_files(clip, sorted(images.rglob("*.png")))
    assert idx.remove([report.added[0]]) == 1
    assert idx.remove(["img001.png"]) == 1
    assert idx.remove([images / "img002.png"]) == 1  # absolute path inside the root
    assert idx.remove(["nested"]) == 3  # a folder
    assert idx.remove([123456, "nope.png", report.added[0]]) == 0
    assert len(idx) == 3 and idx.verify()["count"] == 3
    assert {r.path for r in idx.records()} == {"img003.png", "img004.png", "img005.png"}


@pytest.mark.parametrize(("kind", "refine"), [("flat", 4), ("hnsw", 4), ("ivfpq", 4), ("ivfpq", 0)])
def test_every_index_type_searches_and_removes(tmp_path: Path, kind: str, refine: int) -> None:
    dim = 32
    params = {"nlist": 16, "nprobe": 16, "refine_k_factor": refine}
    idx = ImageIndex.create(tmp_path / "idx", "m" * 64, dim=dim, index_type=kind, params=params)
    vecs = unit(1500, dim)
    idx.add_embeddings(vecs, fake_images(1500))
    assert idx.index_type == kind  # ivfpq trains once it holds enough vectors
    top = idx.search_by_vector(vecs[:20], k=1)
    hit = np.mean([r[0].path == f"v/{i}.png" for i, r in enumerate(top)])
    assert hit >= (0.5 if kind == "ivfpq" and not refine else 0.99)  # bare PQ codes rank coarsely
    removed_ids = [r[0].id for r in top[:10] if r[0].path == f"v/{top.index(r)}.png"]
    assert idx.remove(removed_ids) == len(removed_ids)
    results = idx.search_by_vector(vecs[:20], k=10, ef_search=64, nprobe=16)
    assert not {h.id for row in results for h in row} & set(removed_ids)
    assert all(len(row) == 10 for row in results)
    info = idx.verify()
    assert info["count"] == 1500 - len(removed_ids)
    if kind == "hnsw" or (kind == "ivfpq" and refine):  # cannot delete: tombstones hide ids until compaction
        assert info["tombstones"] == len(removed_ids) and info["faiss_ntotal"] == 1500
        idx.rebuild()
        assert idx.verify() == {"count": 1500 - len(removed_ids), "faiss_ntotal": 1500 - len(removed_ids), "tombstones": 0}
    else:
        assert info["tombstones"] == 0 and info["faiss_ntotal"] == 1500 - len(removed_ids)
    reopened = ImageIndex.open(tmp_path / "idx", mmap=True)
    assert reopened.search_by_vector(vecs[15:16], k=3)[0] == idx.search_by_vector(vecs[15:16], k=3)[0]


def test_hnsw_compacts_when_tombstones_pile_up(tmp_path: Path) -> None:
    idx = ImageIndex.create(tmp_path / "idx", "m" * 64, dim=16, index_type="hnsw")
    vecs = unit(200, 16, seed=1)
    added = idx.add_embeddings(vecs, fake_images(200)).added
    idx.remove(added[:40])
    assert idx.verify()["tombstones"] == 40
    idx.remove(added[40:60])  # 60 of 200 > 25%: rebuilt without them
    assert idx.verify() == {"count": 140, "faiss_ntotal": 140, "tombstones": 0}
    assert idx.search_by_vector(vecs[100:101], k=1)[0][0].id == added[100]


def test_auto_type_is_promoted_as_the_index_grows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "FLAT_MAX", 100)  # the real threshold is 100k vectors
    idx = ImageIndex.create(tmp_path / "idx", "m" * 64, dim=16)
    vecs = unit(150, 16, seed=2)
    idx.add_embeddings(vecs[:80], fake_images(80))
    assert idx.index_type == "flat"
    idx.add_embeddings(vecs[80:], fake_images(70, start=80))
    assert idx.index_type == "hnsw" and idx.info()["requested_type"] == "auto"
    assert idx.verify()["count"] == 150
    assert idx.search_by_vector(vecs[5:6], k=1)[0][0].path == "v/5.png"
    idx.rebuild("flat")
    assert idx.index_type == "flat" and idx.search_by_vector(vecs[120:121], k=1)[0][0].path == "v/120.png"


def test_ivfpq_needs_enough_vectors_to_train(tmp_path: Path) -> None:
    idx = ImageIndex.create(tmp_path / "idx", "m" * 64, dim=16, index_type="ivfpq")
    idx.add_embeddings(unit(50, 16), fake_images(50))
    assert idx.index_type == "flat"  # exact until trainable
    with pytest.raises(IndexStoreError, match="ivfpq index needs at least"):
        backends.new_index("ivfpq", 16, backends.parse_params({}), unit(10, 16))  # 4-bit codes: 16 codewords
    with pytest.raises(IndexStoreError, match="ef_search"):
        ImageIndex.create(tmp_path / "bad", "m" * 64, dim=16, params={"ef_search": 0})


def test_uploads_and_path_traversal(tmp_path: Path, clip: CLIPInference, images: Path) -> None:
    idx = ImageIndex.create(tmp_path / "idx", clip, root=images)
    report = idx.add_bytes(clip, [("../../../etc/evil.png", png_bytes(77), "up"), ("x.png", b"garbage", None)])
    assert len(report.added) == 1 and report.failed[0][0] == "x.png"
    stored = idx.resolve_path(report.added[0])
    assert stored.parent == (tmp_path / "idx" / "uploads").resolve() and stored.read_bytes() == png_bytes(77)
    assert idx.get(report.added[0]).caption == "up"
    assert idx.add_bytes(clip, [("again.png", png_bytes(77), None)]).duplicates == [("again.png", report.added[0])]
    # paths that would leave the root are refused everywhere
    for bad in ("../outside.png", "/etc/passwd", "a/../../b.png"):
        with pytest.raises(PathOutsideRootError):
            idx.add_embeddings(unit(1, clip.dim), [NewImage(bad, "f" * 64, 1, 1)])
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(78))
    (images / "link.png").symlink_to(outside)
    failed = idx.add_files(clip, [images / "link.png", outside]).failed
    assert len(failed) == 2 and all("outside the index root" in why for _, why in failed)
    copied = idx.add_files(clip, [outside], copy_outside_root=True)
    assert idx.resolve_path(copied.added[0]).is_relative_to((tmp_path / "idx" / "uploads").resolve())
    # a record whose file was swapped for a symlink pointing outside is refused at serving time
    rec_id = idx.add_files(clip, [images / "img000.png"]).added[0]
    (images / "img000.png").unlink()
    (images / "img000.png").symlink_to(outside)
    with pytest.raises(PathOutsideRootError):
        idx.resolve_path(rec_id)
    # removing an upload deletes the file the index stored
    assert idx.remove([report.added[0]]) == 1 and not stored.exists()


def test_checkpoint_mismatch_and_bad_input_are_refused(tmp_path: Path, clip: CLIPInference, images: Path) -> None:
    ImageIndex.create(tmp_path / "idx", clip, root=images).close()
    with pytest.raises(IndexMismatchError, match="built with checkpoint"):
        ImageIndex.open(tmp_path / "idx", model_id="0" * 64)
    other = CLIPInference(clip.model, clip.tokenizer, {**clip.meta, "content_hash": "1" * 64})
    idx = ImageIndex.open(tmp_path / "idx", model_id=clip.model_id)
    with pytest.raises(IndexMismatchError):
        idx.search_text(other, "a dog")
    with pytest.raises(IndexMismatchError):
        idx.add_files(other, [images / "img000.png"])
    with pytest.raises(IndexStoreError, match="shape"):
        idx.search_by_vector(np.zeros((1, clip.dim + 1), np.float32), k=1)
    with pytest.raises(IndexStoreError, match="positive"):
        idx.search_by_vector(np.ones((1, clip.dim), np.float32), k=0)
    with pytest.raises(IndexStoreError, match="NaN"):
        idx.search_by_vector(np.full((1, clip.dim), np.nan, np.float32), k=1)
    assert idx.search_by_vector(np.ones((2, clip.dim), np.float32), k=3) == [[], []]  # empty index
    with pytest.raises(IndexExistsError):
        ImageIndex.create(tmp_path / "idx", clip)
    with pytest.raises(IndexNotFoundError):
        ImageIndex.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="not a clipforge index"):
        ImageIndex.open(tmp_path / "empty")
    with pytest.raises(IndexStoreError, match="unknown index type"):
        ImageIndex.create(tmp_path / "t", clip, index_type="annoy")


def test_other_handle_reloads_after_a_write(tmp_path: Path) -> None:
    a = ImageIndex.create(tmp_path / "idx", "m" * 64, dim=8)
    b = ImageIndex.open(tmp_path / "idx")
    a.add_embeddings(unit(5, 8), fake_images(5))
    assert len(b) == 0 and b.reload_if_changed() and len(b) == 5 and not b.reload_if_changed()
    b.add_embeddings(unit(3, 8, seed=3), fake_images(3, start=5))  # b writes on top of a's commit
    a.reload_if_changed()
    assert len(a) == 8 and a.verify()["count"] == 8
    gens = sorted(p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith("gen-"))
    assert len(gens) <= 2 and not [p for p in os.listdir(tmp_path / "idx") if p.endswith(".tmp")]


def test_create_over_the_leftovers_of_a_killed_create(tmp_path: Path) -> None:
    path = tmp_path / "idx"
    (path / "gen-00000001").mkdir(parents=True)  # renamed, but CURRENT was never written
    (path / ".gen-00000002.tmp").mkdir()
    with pytest.raises(IndexNotFoundError):
        ImageIndex.open(path)
    idx = ImageIndex.create(path, "m" * 64, dim=8)
    assert len(idx) == 0 and sorted(os.listdir(path)) == [".lock", "CURRENT", "gen-00000001"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(IndexExistsError, match="not an empty folder"):
        ImageIndex.create(tmp_path / "other", "m" * 64, dim=8)


def test_big_flat_index_answers_single_queries_through_the_half_precision_scan(tmp_path: Path) -> None:
    from index.backends import HalfPrecisionScan

    dim, n = 16, HalfPrecisionScan.MIN_VECTORS + 500
    idx = ImageIndex.create(tmp_path / "idx", "m" * 64, dim=dim, index_type="flat")
    vecs = unit(n, dim)
    idx.add_embeddings(vecs, fake_images(n))
    assert idx._state.half_scan is not None
    queries = unit(5, dim, seed=9)
    batch = idx.search_by_vector(queries, k=10)  # two or more queries: the float32 BLAS path
    single = [idx.search_by_vector(q, k=10)[0] for q in queries]
    assert [[h.id for h in row] for row in single] == [[h.id for h in row] for row in batch]
    idx.remove([batch[0][0].id])  # a new generation gets its own float16 copy, without the removed vector
    assert batch[0][0].id not in {h.id for h in idx.search_by_vector(queries[0], k=10)[0]}
    assert ImageIndex.open(tmp_path / "idx", mmap=True)._state.half_scan is None


def test_paths_resolved_in_bulk_refuse_links_out_of_the_root_as_one_at_a_time_does(tmp_path: Path) -> None:
    """resolve_all_inside resolves each folder once: a linked folder or file leading out is still refused."""
    from index.errors import PathOutsideRootError
    from index.files import resolve_all_inside, resolve_inside

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (root / "a" / "in.png").write_bytes(b"x")
    (root / "out").symlink_to(outside)  # a folder link out
    (root / "a" / "ln.png").symlink_to(outside / "secret.png")  # a file link out
    (root / "a" / "ok.png").symlink_to(root / "a" / "in.png")  # a link that stays inside
    (root / "inner").symlink_to(root / "a")  # a folder link that stays inside
    good = ["a/in.png", "a/b/new.png", "a/ok.png", "inner/in.png", "a/./in.png", "missing/x.png"]
    assert resolve_all_inside(root, good) == [resolve_inside(root, p) for p in good]
    assert resolve_all_inside(root, ["inner/in.png"]) == [(root / "a" / "in.png").resolve()]
    for bad in ("out/secret.png", "a/ln.png", "../outside/secret.png", "/etc/passwd", "", "a/\x00.png"):
        with pytest.raises(PathOutsideRootError):
            resolve_all_inside(root, ["a/in.png", bad])
