"""The index's own files across crashes (issue 16 section 2): a file stored for a commit that never happened is
cleaned up when the index next opens or writes, a committed one is never lost, and a copy of an older index never
deletes the original's files. Real processes killed with os._exit or SIGKILL, as in test_index_durability.py."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from filelock import FileLock
from index_helpers import kill_9_and_read_acks
from test_app_support import API_KEY, ROOT, live_server, shape_image

from index import ImageIndex, IndexStoreError, NewImage
from index import store as index_store
from index.uploads import PENDING
from model import CLIPInference

AUTH = {"Authorization": f"Bearer {API_KEY}"}

CRASH = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import index.image_index as ii
    from model import CLIPInference
    stage = sys.argv[3]
    if stage == "add":  # killed after the file is written, before the generation is published
        ii.commit_generation = lambda *a, **k: os._exit(9)
    else:  # killed after the removal is published, before the stored file is unlinked
        swap = ii.ImageIndex._swap
        ii.ImageIndex._swap = lambda self, committed: (swap(self, committed), os._exit(9))
    idx = ii.ImageIndex.open(sys.argv[1])
    clip = CLIPInference.load(sys.argv[2])
    if stage == "add":
        idx.add_bytes(clip, [("crash.png", open(sys.argv[4], "rb").read(), None)])
    else:
        idx.remove([int(sys.argv[4])])
""")


def crash(tmp_path: Path, directory: Path, checkpoint: Path, stage: str, arg: str) -> None:
    script = tmp_path / "crash.py"
    script.write_text(CRASH.format(root=str(ROOT)))
    run = subprocess.run([sys.executable, str(script), str(directory), str(checkpoint), stage, arg],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 9, run.stderr[-2000:]


def test_an_upload_orphaned_by_a_crash_is_removed_when_the_index_next_opens(tiny_checkpoint: Path,
                                                                             tmp_path: Path) -> None:
    clip = CLIPInference.load(tiny_checkpoint)
    directory = tmp_path / "idx"
    ImageIndex.create(directory, clip, root=tmp_path).close()
    image = tmp_path / "up.png"
    image.write_bytes(shape_image("square", "green", size=40))
    crash(tmp_path, directory, tiny_checkpoint, "add", str(image))
    orphans = list((directory / "uploads").iterdir())
    assert len(orphans) == 1 and (directory / PENDING).is_file()  # written, never committed

    # the real service opens it at start-up: the orphan is gone, the index as it was
    args = ["--checkpoint", str(tiny_checkpoint), "--index", str(directory)]
    with live_server({"CLIPFORGE_API_KEYS": API_KEY}, args, tmp_path / "serve.log") as server:
        assert httpx.get(server.url + "/info", timeout=30).json()["index"]["size"] == 0
        assert not orphans[0].exists() and not (directory / PENDING).exists()
        r = httpx.post(server.url + "/images", files={"images": ("up.png", image.read_bytes())}, headers=AUTH,
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["added"]) == 1, r.text
        stored = httpx.get(server.url + f"/images/{r.json()['added'][0]['id']}", timeout=30)
        assert stored.status_code == 200 and stored.content == image.read_bytes()
    assert not (directory / PENDING).exists()  # a committed upload settles its journal


def test_a_crash_after_removing_an_entry_leaves_no_file_once_the_index_next_writes(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    clip = CLIPInference.load(tiny_checkpoint)
    directory = tmp_path / "idx"
    with ImageIndex.create(directory, clip) as idx:
        image_id = idx.add_bytes(clip, [("keep.png", shape_image(size=40), None)]).added[0]
        stored = idx.resolve_path(image_id)
    crash(tmp_path, directory, tiny_checkpoint, "remove", str(image_id))
    assert stored.exists() and (directory / PENDING).is_file()  # removed from the index, file still there
    lock = FileLock(str(directory / index_store.LOCK))
    with lock:  # another writer holds the lock: the open leaves the clean-up to it
        idx = ImageIndex.open(directory)
        assert len(idx) == 0 and stored.exists() and (directory / PENDING).is_file()
    with idx:  # this index's next write settles it
        idx.add_embeddings(np.eye(1, clip.dim, dtype=np.float32), [NewImage("other.png", "f" * 64, 1, 1)])
        assert not stored.exists() and not (directory / PENDING).exists() and len(idx) == 1


def test_a_commit_that_publishes_and_then_fails_keeps_its_files(tiny_checkpoint: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The clean-up judges the journal against the generation on disk, not the one this object last loaded."""
    from index import image_index

    clip = CLIPInference.load(tiny_checkpoint)
    real_commit = image_index.commit_generation

    def published_then_failed(*args, **kwargs):  # e.g. the directory fsync after the CURRENT rename fails
        real_commit(*args, **kwargs)
        raise OSError("fsync failed after the commit point")

    directory = tmp_path / "idx"
    with ImageIndex.create(directory, clip, root=tmp_path) as idx:
        kept = idx.add_bytes(clip, [("kept.png", shape_image("circle", size=40), None)]).added[0]
        monkeypatch.setattr(image_index, "commit_generation", published_then_failed)
        with pytest.raises(OSError):
            idx.add_bytes(clip, [("late.png", shape_image("square", size=40), None)])
        with pytest.raises(OSError):
            idx.remove([kept])
    monkeypatch.undo()
    with ImageIndex.open(directory) as idx:
        (late,) = idx.records()
        assert late.path.endswith("-late.png") and idx.resolve_path(late.id).read_bytes() == shape_image("square", size=40)
        assert [p.name for p in (directory / "uploads").iterdir()] == [Path(late.path).name]  # kept.png went with it
    assert not (directory / PENDING).exists()


# A writer uploading and removing without end, killed at random: it prints every acknowledged add and remove.
UPLOADER = textwrap.dedent("""
    import io, sys
    import numpy as np
    from PIL import Image
    from index import ImageIndex
    from model import CLIPInference
    idx, clip = ImageIndex.open(sys.argv[1]), CLIPInference.load(sys.argv[2])
    rng = np.random.default_rng(int(sys.argv[3]))
    live = [r.id for r in idx.records(0, 10_000)]
    print("READY", flush=True)
    step = 0
    while True:
        step += 1
        items = []
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
            items.append((f"{sys.argv[3]}-{step}-{i}.png", buf.getvalue(), None))
        added = idx.add_bytes(clip, items).added
        live += added
        print("ADD " + " ".join(map(str, added)), flush=True)
        if step % 2 == 0:
            gone = [int(i) for i in rng.choice(live, size=2, replace=False)]
            print("WILL_DEL " + " ".join(map(str, gone)), flush=True)
            idx.remove(gone)
            live = [i for i in live if i not in gone]
            print("DEL " + " ".join(map(str, gone)), flush=True)
""")


def test_kill_9_while_uploading_leaves_exactly_the_files_the_index_refers_to(tiny_checkpoint: Path,
                                                                             tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    directory = tmp_path / "idx"
    ImageIndex.create(directory, CLIPInference.load(tiny_checkpoint), root=photos).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    acked_add: set[int] = set()
    acked_del: set[int] = set()
    rng = random.Random(16)
    for attempt in range(6):  # each kill lands inside a commit about a third of the time
        proc = subprocess.Popen([sys.executable, "-c", UPLOADER, str(directory), str(tiny_checkpoint), str(attempt)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        time.sleep(rng.uniform(0.2, 1.5))  # lands anywhere: storing a file, committing, settling, between writes
        acks = kill_9_and_read_acks(proc)
        acked_add |= acks.added
        acked_del |= acks.deleted
        in_flight = acks.in_flight
        with ImageIndex.open(directory) as idx:  # the lock is free: the open settles what the kill left
            records = idx.records(0, 10_000)
            live = {r.id for r in records}
            assert acked_add - acked_del - in_flight <= live and not live & acked_del
            for r in records:  # every stored upload is whole and in the index's own folder
                assert hashlib.sha256(idx.resolve_path(r.id).read_bytes()).hexdigest() == r.sha256
            on_disk = {p.name for p in (directory / "uploads").iterdir()}
            assert on_disk == {Path(r.path).name for r in records}, "orphaned or missing upload files"
            assert not (directory / PENDING).exists() and not (photos / "uploads").exists()
        acked_add |= live
        acked_del |= in_flight - live
    assert len(acked_add) > 0


def as_older_index(directory: Path, root: Path) -> None:
    """Turn an index into one as made before issue 16: its stored files under ROOT/uploads, no uploads_in_index."""
    if (directory / "uploads").exists():
        shutil.move(directory / "uploads", root / "uploads")
    manifest = directory / index_store.gen_name(index_store.read_current(directory)) / index_store.MANIFEST_FILE
    data = json.loads(manifest.read_text())
    del data["uploads_in_index"]
    manifest.write_text(json.dumps(data))


def older_index_with_an_upload(clip: CLIPInference, tmp_path: Path) -> tuple[Path, Path, int, bytes]:
    """An older index over tmp_path/photos holding one upload (in photos/uploads): its folder, the file, id, bytes."""
    photos, directory, content = tmp_path / "photos", tmp_path / "old", shape_image("square", "green", size=40)
    photos.mkdir()
    with ImageIndex.create(directory, clip, root=photos) as idx:
        image_id = idx.add_bytes(clip, [("old.png", content, None)]).added[0]
    as_older_index(directory, photos)
    (stored,) = (photos / "uploads").iterdir()
    return directory, stored, image_id, content




def test_an_upload_is_removed_by_its_path_in_the_index_folder_not_by_a_root_file_of_that_name(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    clip = CLIPInference.load(tiny_checkpoint)
    photos = tmp_path / "photos"
    with ImageIndex.create(tmp_path / "idx", clip, root=photos.mkdir() or photos) as idx:
        image_id = idx.add_bytes(clip, [("up.png", shape_image(size=40), None)]).added[0]
        stored = idx.resolve_path(image_id)
        assert stored.parent == idx.uploads_dir == (tmp_path / "idx" / "uploads").resolve()
        look_alike = photos / "uploads" / stored.name  # a file of the user's own, named like the upload
        look_alike.parent.mkdir()
        look_alike.write_bytes(b"mine")
        assert idx.remove([look_alike]) == 0 and idx.remove([str(look_alike.parent)]) == 0 and len(idx) == 1
        assert idx.remove([stored]) == 1 and len(idx) == 0
        assert not stored.exists() and look_alike.read_bytes() == b"mine"


def test_a_copy_of_an_older_index_never_deletes_the_originals_uploads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """An older index's copies share ROOT/uploads with it: a copy's first write takes its own copies first."""
    clip = CLIPInference.load(tiny_checkpoint)
    original, stored, image_id, content = older_index_with_an_upload(clip, tmp_path)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(original), str(copy)], check=True)
    with ImageIndex.open(copy) as idx:
        assert idx.resolve_path(image_id) == stored.resolve()  # read where the older index keeps it
        assert idx.remove([image_id]) == 1 and len(idx) == 0  # the write moved it in, then removed its own copy
        assert not (copy / "uploads" / stored.name).exists()
    assert stored.read_bytes() == content  # the original's file is untouched
    with ImageIndex.open(original) as idx:
        assert idx.resolve_path(image_id).read_bytes() == content


def test_a_crash_while_an_older_index_moves_its_uploads_in_loses_nothing(tiny_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    clip = CLIPInference.load(tiny_checkpoint)
    directory, stored, image_id, content = older_index_with_an_upload(clip, tmp_path)
    new_image = tmp_path / "new.png"
    new_image.write_bytes(shape_image("circle", "red", size=40))
    crash(tmp_path, directory, tiny_checkpoint, "add", str(new_image))  # killed at the move's commit
    assert (directory / "uploads" / stored.name).read_bytes() == content  # copied, not yet in use
    with ImageIndex.open(directory) as idx:
        assert idx.resolve_path(image_id) == stored.resolve() and len(idx) == 1  # still the older layout
        new_id = idx.add_bytes(clip, [("new.png", new_image.read_bytes(), None)]).added[0]
        assert idx.uploads_dir == (directory / "uploads").resolve()
        assert idx.resolve_path(image_id).read_bytes() == content and idx.resolve_path(image_id).parent == idx.uploads_dir
        assert idx.resolve_path(new_id).read_bytes() == new_image.read_bytes()
        assert sorted(p.name for p in idx.uploads_dir.iterdir()) == sorted(Path(r.path).name for r in idx.records())
    assert stored.read_bytes() == content  # the original under the root is never deleted


def test_the_uploads_folder_cannot_take_the_name_of_the_index_own_files(tmp_path: Path) -> None:
    for bad in ("gen-00000002", "CURRENT", ".lock", ".", "gen-00000003/up"):
        with pytest.raises(IndexStoreError, match="mix with the index's own files"):
            ImageIndex.create(tmp_path / "idx", "m" * 64, dim=8, uploads=bad)
    ImageIndex.create(tmp_path / "idx", "m" * 64, dim=8, uploads="stored/files").close()
