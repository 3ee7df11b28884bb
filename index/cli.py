"""`clipforge index build|add|remove|info|search|rebuild`: manage an image index from the shell (no server)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.config import PRECISION_NAMES

from .backends import REQUESTABLE
from .errors import IndexStoreError
from .image_index import ImageIndex
from .locations import create_index, open_index, resolve_location
from .types import AddReport

if TYPE_CHECKING:
    from model import CLIPInference

    from .protocol import IndexStore
    from .search_filter import SearchFilter


def _recorded_checkpoint(idx: IndexStore) -> str | None:
    """The checkpoint path recorded at build, by either store."""
    if isinstance(idx, ImageIndex):
        return idx.manifest.checkpoint_path
    return getattr(idx, "checkpoint_path", None)


def _load_clip(
    checkpoint: str | None, idx: IndexStore | None, *, device: str, max_pixels: int | None = None,
    precision: str = "fp32",
) -> CLIPInference:
    from model import CLIPInference
    from model.device import resolve_device

    path = checkpoint or (_recorded_checkpoint(idx) if idx is not None else None)
    if not path:
        raise IndexStoreError("this index records no checkpoint path; pass --checkpoint")
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    return CLIPInference.load(path, device=resolve_device(device), precision=precision, **kwargs)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe", "pq_m", "refine_k_factor")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _print_report(report: AddReport, seconds: float, limit: int = 50) -> None:
    n = len(report.added)
    rate = n / seconds if seconds > 0 else 0.0
    line = (f"added {n} image(s) in {seconds:.1f}s ({rate:.1f} images/s), {len(report.duplicates)} duplicate(s), "
            f"{len(report.failed)} skipped")
    if report.replaced:
        line += f", {len(report.replaced)} replaced (content changed)"
    print(line)
    if report.failed:
        print("skipped (corrupt, oversized or unreadable):", file=sys.stderr)
        for name, reason in report.failed[:limit]:
            print(f"  {name}: {reason}", file=sys.stderr)
        if len(report.failed) > limit:
            print(f"  ... and {len(report.failed) - limit} more", file=sys.stderr)


def _records_from_spec(spec_text: str) -> tuple[list[Path | bytes], list[str], list[str | None]]:
    # index may import training.data for this option only (data flows training -> index, never back from app).
    from training.data import load_records, parse_data_spec

    records = load_records(parse_data_spec(spec_text)).records
    images = [r.image if isinstance(r.image, bytes) else Path(r.image) for r in records]
    names = [r.key for r in records]
    captions = [r.captions[0] if r.captions else None for r in records]
    return images, names, captions


def cmd_build(args: argparse.Namespace) -> int:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every rank embeds a share, rank 0 writes
        from .distributed_build import build

        return build(args)
    where = resolve_location(args.out)
    out = where if isinstance(where, Path) else None  # a FAISS folder, or None for a Milvus collection
    if out is not None and (out / "CURRENT").exists():
        raise IndexStoreError(f"{out} already holds an index; use `clipforge index add {out} DIR` (duplicates are skipped)")
    clip = _load_clip(args.checkpoint, None, device=args.device, max_pixels=args.max_pixels, precision=args.precision)
    params = _params(args)
    started = time.perf_counter()
    if args.images:
        images_dir = Path(args.images)
        if not images_dir.is_dir():
            raise IndexStoreError(f"--images {images_dir} is not a folder")
        from .files import iter_image_files

        files = iter_image_files(images_dir, exclude=[out] if out is not None else [])
        if not files:
            raise IndexStoreError(f"no image files ({', '.join(sorted({'jpg', 'png', 'webp', 'gif', 'bmp', 'tiff'}))}) under {images_dir}")
        index_type = args.type
        idx = create_index(args.out, clip, index_type=index_type, root=args.root or images_dir, params=params,
                           checkpoint_path=args.checkpoint)
        print(f"indexing {len(files)} image file(s) from {images_dir} into {args.out}", file=sys.stderr)
        report = idx.add_files(clip, files, batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
    else:
        images, names, captions = _records_from_spec(args.data)
        if not images:
            raise IndexStoreError(f"the data spec {args.data} holds no images")
        paths = [i for i in images if isinstance(i, Path)]
        root = Path(args.root) if args.root else (Path(_common_parent(paths)) if len(paths) == len(images) else out)
        idx = create_index(args.out, clip, index_type=args.type, root=root, params=params, checkpoint_path=args.checkpoint)
        print(f"indexing {len(images)} image(s) from {args.data} into {args.out}", file=sys.stderr)
        report = AddReport()
        if paths and len(paths) == len(images):
            report = idx.add_files(clip, paths, captions, batch_size=args.batch_size, workers=args.workers,
                                   progress=not args.quiet)
        else:  # bytes (e.g. parquet) are stored in the index's uploads folder
            report = idx.add_bytes(clip, [(n if isinstance(i, bytes) else str(i), i if isinstance(i, bytes) else i.read_bytes(), c)
                                          for n, i, c in zip(names, images, captions)])
    _print_report(report, time.perf_counter() - started)
    print(f"index {args.out}: {len(idx)} image(s), type {idx.index_type}")
    count = len(idx)
    idx.close()
    return 0 if count else 1


def _common_parent(paths: list[Path]) -> str:
    import os

    return os.path.commonpath([str(p.resolve().parent) for p in paths])


def cmd_add(args: argparse.Namespace) -> int:
    from .files import expand_inputs

    idx = open_index(args.index)
    clip = _load_clip(args.checkpoint, idx, device=args.device, max_pixels=args.max_pixels, precision=args.precision)
    idx.check_model(clip)
    files = expand_inputs(args.paths, exclude=[idx.directory] if isinstance(idx, ImageIndex) else [])
    started = time.perf_counter()
    report = idx.add_files(clip, files, batch_size=args.batch_size, workers=args.workers,
                           progress=not args.quiet and len(files) > 100, copy_outside_root=args.copy)
    _print_report(report, time.perf_counter() - started)
    for name, existing in report.duplicates[:20]:
        print(f"  duplicate: {name} (already indexed as id {existing})")
    print(f"index {args.index}: {len(idx)} image(s)")
    return 0 if not report.failed else 1


def cmd_remove(args: argparse.Namespace) -> int:
    idx = open_index(args.index)
    targets: list[int | str] = [int(t) if t.isdigit() else t for t in args.targets]
    removed = idx.remove(targets)
    print(f"removed {removed} image(s); index {args.index}: {len(idx)} image(s)")
    return 0 if removed else 1


def cmd_info(args: argparse.Namespace) -> int:
    idx = open_index(args.index)
    info = idx.info()
    if args.verify:
        info["verified"] = idx.verify()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if info.get("store") == "milvus":
        _print_milvus_info(info)
        return 0
    print(f"{info['path']}: {info['count']} image(s), {info['index_type']} index (requested {info['requested_type']}), "
          f"{info['dim']}-d {info['metric']}")
    print(f"  checkpoint {info['checkpoint_hash'][:16]}  ({info['checkpoint_path'] or 'path not recorded'})")
    print(f"  root {info['root']}  uploads {info['uploads']}")
    print(f"  generation {info['generation']}  tombstones {info['tombstones']}  size {info['size_bytes'] / 1e6:.2f} MB")
    print(f"  created {info['created']}  updated {info['updated']}")
    p = info["params"]
    if info["index_type"] in ("hnsw", "hnswsq"):
        codes = f" over 8-bit codes, re-score factor={p['refine_k_factor']}" if info["index_type"] == "hnswsq" else ""
        print(f"  HNSW M={p['hnsw_m']} efConstruction={p['ef_construction']} efSearch={p['ef_search']}{codes}")
    elif info["index_type"] == "ivfpq":
        print(f"  IVF-PQ nlist={p['nlist']} nprobe={p['nprobe']} m={p['pq_m']} nbits={p['pq_nbits']} "
              f"re-rank factor={p.get('refine_k_factor') or 'off'}")
    if args.verify:
        print(f"  verified: {info['verified']}")
    return 0


def _print_milvus_info(info: dict[str, Any]) -> None:
    p = info["params"]
    print(f"{info['path']}: {info['count']} image(s), Milvus {info['index_type']} index (requested "
          f"{info['requested_type']}), {info['dim']}-d {info['metric']}")
    print(f"  checkpoint {info['checkpoint_hash'][:16]}  ({info['checkpoint_path'] or 'path not recorded'})")
    print(f"  server {info['uri']}  collection {info['collection']}  image bytes in {info['uploads']} "
          f"(up to {info['max_image_bytes'] / 1e6:.0f} MB each)")
    print(f"  root {info['root'] or 'none'}  created {info['created']}  updated {info['updated']}")
    if info["index_type"] == "hnsw":
        print(f"  HNSW M={p['hnsw_m']} efConstruction={p['ef_construction']} efSearch={p['ef_search']}")
    if "verified" in info:
        print(f"  verified: {info['verified']}")


def _search_filter(args: argparse.Namespace) -> SearchFilter | None:
    from .search_filter import SearchFilter

    given = SearchFilter(path_prefix=args.path_prefix, caption_contains=args.caption_contains,
                         added_after=args.added_after, added_before=args.added_before,
                         min_width=args.min_width, min_height=args.min_height)
    return None if given.empty else given


def cmd_search(args: argparse.Namespace) -> int:
    conditions = _search_filter(args)
    idx = open_index(args.index, mmap=args.mmap)
    clip = _load_clip(args.checkpoint, idx, device=args.device)
    idx.check_model(clip)
    if args.image:
        vectors = clip.embed_images([args.image])
    elif args.text:
        vectors = clip.embed_texts([args.text])
    else:
        raise IndexStoreError("give a query text or --image FILE")
    hits = idx.search_by_vector(vectors, args.k, args.min_score, ef_search=args.ef_search, nprobe=args.nprobe,
                                filter=conditions)[0]
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], indent=2))
        return 0
    if not hits:
        print("no results")
    for rank, h in enumerate(hits, 1):
        caption = f"  {h.caption}" if h.caption else ""
        print(f"{rank:3d}. {h.score:+.4f}  id {h.id:<7d} {h.path}{caption}")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    idx = open_index(args.index)
    if not isinstance(idx, ImageIndex):
        raise IndexStoreError(f"{args.index}: the Milvus store cannot change a built index; build another collection "
                              "with `clipforge index build --out milvus://HOST:PORT/NEW` and point the service at it")
    before = idx.info()
    idx.rebuild(args.type, _params(args) or None)
    print(f"rebuilt {args.index}: {before['index_type']} -> {idx.index_type}, {len(idx)} image(s), "
          f"{before['tombstones']} tombstone(s) compacted")
    return 0


def _add_type_flags(p: argparse.ArgumentParser, with_type_default: bool) -> None:
    p.add_argument("--type", choices=REQUESTABLE, default="auto" if with_type_default else None,
                   help="index type (auto: exact up to 100k images, HNSW over 8-bit codes with exact re-scoring "
                        "(hnswsq) up to 250k, IVF-PQ with exact re-ranking beyond)")
    p.add_argument("--hnsw-m", type=int, help="HNSW graph degree (default 32)")
    p.add_argument("--ef-construction", type=int, help="HNSW build candidate list (default 200)")
    p.add_argument("--ef-search", type=int, help="HNSW query candidate list (default 128)")
    p.add_argument("--nlist", type=int, help="IVF lists (default 4*sqrt(n))")
    p.add_argument("--nprobe", type=int, help="IVF lists scanned per query (default 24)")
    p.add_argument("--pq-m", type=int, help="PQ sub-quantizers (default dim/2; codes only: dim/4)")
    p.add_argument("--refine-k-factor", type=int,
                   help="IVF-PQ, HNSW-SQ: re-rank k*factor candidates with float16 vectors (default 8 and 4; 0: IVF-PQ codes only)")


def _add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (the GPU when one is visible)")


def _add_embed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores - 1, up to 8)")
    _add_device_flag(p)
    p.add_argument("--precision", choices=PRECISION_NAMES, default="fp32",
                   help="forward passes in fp32 or bf16 (faster on CPUs with AMX or AVX512-BF16)")
    p.add_argument("--max-pixels", type=int, default=None, help="skip images with more pixels than this")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


_MILVUS_FORMS = "milvus://HOST:PORT/COLLECTION or milvus-lite:PATH.db/COLLECTION (Milvus)"
_INDEX_HELP = f"index directory, {_MILVUS_FORMS}, or a file holding one such location"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("index", help="build, update and search an image index")
    isub = parser.add_subparsers(dest="index_command", metavar="ACTION")
    isub.required = True

    build = isub.add_parser("build", help="embed a folder of images (or a data set) into a new index")
    build.add_argument("--checkpoint", required=True, help="checkpoint directory")
    src = build.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder walked recursively for jpg/png/webp/gif/bmp/tiff files")
    src.add_argument("--data", help="a training data spec (e.g. csv:captions.txt); keeps captions")
    build.add_argument("--out", required=True, help=f"index to create: a directory (FAISS), or {_MILVUS_FORMS}")
    build.add_argument("--root", help="folder stored paths are relative to (default: --images)")
    _add_type_flags(build, True)
    _add_embed_flags(build)
    build.set_defaults(func=cmd_build)

    add = isub.add_parser("add", help="embed and add image files or folders")
    add.add_argument("index", help=_INDEX_HELP)
    add.add_argument("paths", nargs="+", help="image files or folders")
    add.add_argument("--checkpoint", help="checkpoint (default: the one recorded at build; the hash must match)")
    add.add_argument("--copy", action="store_true", help="copy files outside the index root into its uploads folder")
    _add_embed_flags(add)
    add.set_defaults(func=cmd_add)

    rm = isub.add_parser("remove", help="remove images by id, path or folder")
    rm.add_argument("index", help=_INDEX_HELP)
    rm.add_argument("targets", nargs="+", help="ids, or paths relative to the root (or absolute inside it)")
    rm.set_defaults(func=cmd_remove)

    info = isub.add_parser("info", help="count, type, parameters and checkpoint of an index")
    info.add_argument("index", help=_INDEX_HELP)
    info.add_argument("--json", action="store_true")
    info.add_argument("--verify", action="store_true",
                      help="also check that FAISS, SQLite and manifest agree (Milvus: ids, times and stored bytes)")
    info.set_defaults(func=cmd_info)

    search = isub.add_parser("search", help="search an index locally by text or image")
    search.add_argument("index", help=_INDEX_HELP)
    search.add_argument("text", nargs="?", help="query text")
    search.add_argument("--image", help="query image file instead of text")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--min-score", type=float, default=None)
    search.add_argument("--ef-search", type=int, default=None)
    search.add_argument("--nprobe", type=int, default=None)
    search.add_argument("--checkpoint", help="checkpoint (default: the one recorded at build)")
    _add_device_flag(search)
    search.add_argument("--mmap", action="store_true", help="memory-map the index instead of loading it")
    search.add_argument("--json", action="store_true")
    search.add_argument("--path-prefix", help="only images whose stored path (relative to the root) starts with this")
    search.add_argument("--caption-contains", help="only images whose caption holds this text (case-sensitive)")
    search.add_argument("--added-after", help="only images added at or after this UTC time (2026-12-02T07:40:31Z)")
    search.add_argument("--added-before", help="only images added before this UTC time")
    search.add_argument("--min-width", type=int, help="only images at least this many pixels wide")
    search.add_argument("--min-height", type=int, help="only images at least this many pixels tall")
    search.set_defaults(func=cmd_search)

    rebuild = isub.add_parser("rebuild", help="re-index stored vectors: compact tombstones, change type or parameters")
    rebuild.add_argument("index")
    _add_type_flags(rebuild, False)
    rebuild.set_defaults(func=cmd_rebuild)
