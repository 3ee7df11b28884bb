"""`clipforge index build` under torchrun: every rank embeds a share of the inputs, rank 0 alone writes the index.

Why it is shaped this way:

- Every rank lists the same inputs itself (a digest of the list, and the checkpoint's model id, are compared, so
  a node that sees other files or another checkpoint is refused). Rank 0 creates the index and decides which
  inputs may be added (root, shadowed uploads), exactly as a single-process build, and broadcasts that as a mask.
- The accepted inputs are dealt round-robin (rank r embeds positions r, r+W, r+2W, ...), so the work balances and
  the order does not depend on W. Ranks run in rounds of ROUND_BATCHES batches each; after a round rank 0
  gathers what every rank found for that stretch of the list (hash, size, error, vector; never pixels), so the
  memory in flight is bounded by the round, whatever the collection size.
- Rank 0 replays each stretch in single-process order, batch by batch of --batch-size, with the de-duplication
  and commit points of additions.ingest, so ids, records, the report and the manifest match a one-process build.
  A rank drops content it has itself embedded before the forward pass; a copy on another rank is embedded there
  and dropped by rank 0. Only rank 0 writes, through ImageIndex's own commit, so its locks and crash-safety hold.
- Errors are reported once, by rank 0; a failing rank's message reaches it through the next collective.
  A Milvus --out is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.distributed as dist

from training.distributed import (
    DistInfo,
    all_gather_objects,
    init_distributed,
    shutdown_distributed,
)

from .additions import (
    MIN_COMMIT_EVERY,
    AddTarget,
    EmbedOptions,
    PendingImage,
    PendingImageFactory,
    files_to_add,
    pending_files,
    pending_uploads,
)
from .errors import IndexStoreError
from .image_index import ImageIndex
from .locations import create_index, resolve_location
from .types import AddReport
from .uploads import split_shadowed

if TYPE_CHECKING:
    import torch

    from model import CLIPInference

ROUND_BATCHES = 8  # batches per rank between two gathers on rank 0


class _Stop(Exception):
    """This rank stops because a rank failed; rank 0 reports why."""


@dataclass(frozen=True)
class _Item:
    """What a rank sends rank 0 about one input it decoded."""

    position: int  # in the accepted list
    sha256: str
    width: int
    height: int
    error: str | None
    row: int  # its row in the round's vectors; -1 when it failed or repeats content this rank already embedded


@dataclass
class _Inputs:
    """The build's inputs as this rank lists them (every rank lists the same, which the digest checks)."""

    sources: list[Path | bytes]
    names: list[str] | None  # record keys of a data spec (None: the file paths name the inputs)
    captions: list[str | None] | None
    digest: str
    source_text: str  # for the "indexing ..." line
    images_dir: Path | None = None


@dataclass
class _Plan:
    """Rank 0's side: the index being filled, and how an accepted input becomes an entry."""

    idx: ImageIndex
    target: AddTarget
    pending_for: PendingImageFactory
    name_of: Callable[[int], str]
    options: EmbedOptions
    report: AddReport
    accepted: np.ndarray  # bool, over _Inputs.sources


def _digest(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _list_inputs(args: argparse.Namespace) -> _Inputs:
    """The same listing cmd_build makes, on every rank (files are read where each rank runs)."""
    from .cli import _records_from_spec
    from .files import iter_image_files

    if args.images:
        images_dir = Path(args.images)
        if not images_dir.is_dir():
            raise IndexStoreError(f"--images {images_dir} is not a folder")
        where = resolve_location(args.out)
        files = iter_image_files(images_dir, exclude=[where] if isinstance(where, Path) else [])
        if not files:
            raise IndexStoreError(f"no image files under {images_dir}")
        rel = [p.relative_to(images_dir).as_posix() for p in files]  # node-independent: mounts may differ
        return _Inputs(list(files), None, None, _digest(rel), f"{len(files)} image file(s) from {images_dir}", images_dir)
    images, names, captions = _records_from_spec(args.data)
    if not images:
        raise IndexStoreError(f"the data spec {args.data} holds no images")
    if not all(isinstance(i, Path) for i in images):  # bytes (e.g. parquet) go to the uploads folder, as add_bytes
        names = [n if isinstance(i, bytes) else str(i) for n, i in zip(names, images)]  # as cmd_build names them
        images = [i if isinstance(i, bytes) else i.read_bytes() for i in images]
    return _Inputs(list(images), names, captions, _digest([*names, *(c or "" for c in captions)]),
                   f"{len(images)} image(s) from {args.data}")


def _check_out(args: argparse.Namespace) -> None:
    where = resolve_location(args.out)
    if not isinstance(where, Path):
        raise IndexStoreError(f"--out {args.out}: a Milvus collection cannot be built under torchrun; build it with "
                              "one process, or build a FAISS folder here")
    if (where / "CURRENT").exists():
        raise IndexStoreError(f"{where} already holds an index; use `clipforge index add {where} DIR` (duplicates are skipped)")


def _plan(args: argparse.Namespace, clip: CLIPInference, inputs: _Inputs) -> _Plan:
    """Create the index and choose the accepted inputs, as cmd_build and add_files/add_bytes do (rank 0)."""
    from .cli import _common_parent, _params

    params = _params(args)
    sources = inputs.sources
    paths = [s for s in sources if isinstance(s, Path)]
    if len(paths) == len(sources):
        if inputs.images_dir is not None:
            root: Path | str = args.root or inputs.images_dir
        else:
            root = Path(args.root) if args.root else Path(_common_parent(paths))
        idx = create_index(args.out, clip, index_type=args.type, root=root, params=params, checkpoint_path=args.checkpoint)
        assert isinstance(idx, ImageIndex)
        idx.check_model(clip)
        files, failed = files_to_add(paths, inputs.captions, root=idx.root, copy_outside_root=False)
        files, shadowed = split_shadowed(idx._uploads, files, copy=False)
        accepted = np.zeros(len(sources), dtype=bool)
        j = 0
        for i, s in enumerate(sources):  # files_to_add and split_shadowed keep the order
            if j < len(files) and files[j].name == str(s):
                accepted[i] = True
                j += 1
        if j != len(files):
            raise IndexStoreError("internal error: the accepted files do not follow the listing")
        options = EmbedOptions(batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
        return _Plan(idx, idx._add_target(), pending_files(files, idx.manifest.uploads),
                     lambda p: str(files[p].source), options, AddReport(failed=failed + shadowed), accepted)
    root = Path(args.root) if args.root else Path(args.out)
    idx = create_index(args.out, clip, index_type=args.type, root=root, params=params, checkpoint_path=args.checkpoint)
    assert isinstance(idx, ImageIndex)
    idx.check_model(clip)
    names, captions = inputs.names or [], inputs.captions or []
    items = [(n, s, c) for n, s, c in zip(names, sources, captions) if isinstance(s, bytes)]  # all of them
    return _Plan(idx, idx._add_target(), pending_uploads(items, idx.manifest.uploads),
                 lambda p: names[p], EmbedOptions(workers=0), AddReport(), np.ones(len(sources), dtype=bool))


def _message(exc: BaseException) -> str:
    from model.errors import ClipforgeError

    if isinstance(exc, (ClipforgeError, FileNotFoundError, PermissionError)):
        return str(exc)
    traceback.print_exc()  # a bug: keep its traceback on the rank that met it
    return f"{type(exc).__name__}: {exc}"


def _agree(info: DistInfo, value: Any, error: str | None) -> list[Any]:
    """Every rank's (error, value); all stop together when any failed, rank 0 saying why."""
    gathered = all_gather_objects((error, value), info)
    failures = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    if failures:
        rank, err = failures[0]
        if info.is_main:
            raise IndexStoreError(err if rank == 0 else f"rank {rank}: {err}")
        raise _Stop
    return [v for _, v in gathered]


def _broadcast(info: DistInfo, obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank_rounds(
    clip: CLIPInference, sources: Sequence[Path | bytes], info: DistInfo, options: EmbedOptions, rounds: int, per_round: int,
) -> Iterator[tuple[list[_Item], np.ndarray]]:
    """This rank's share (positions rank, rank+W, ...) embedded, one round at a time."""
    from .ingest import DEFAULT_MAX_FILE_BYTES, Decoded, embed_sources

    rank, world = info.rank, info.world_size
    share = list(sources[rank::world])
    seen: set[str] = set()

    def skip(items: list[Decoded]) -> set[int]:  # content this rank embedded earlier: a repeat wherever the first copy is
        drop = set()
        for d in items:
            if d.sha256 in seen:
                drop.add(d.position)
            else:
                seen.add(d.sha256)
        return drop

    batches = embed_sources(
        clip, share, batch_size=options.batch_size, workers=options.workers,
        max_bytes=options.max_bytes or DEFAULT_MAX_FILE_BYTES, skip=skip, progress=options.progress and info.is_main,
    )
    done = 0
    for k in range(rounds):
        end = min((k + 1) * per_round, len(share))
        items: list[_Item] = []
        vectors: list[np.ndarray] = []
        while done < end:
            batch = next(batches)
            rows = {d.position: len(vectors) + n for n, d in enumerate(batch.items)}
            vectors.extend(batch.vectors)
            for d in sorted(batch.items + batch.failed + batch.skipped, key=lambda d: d.position):
                items.append(_Item(rank + d.position * world, d.sha256, d.width, d.height, d.error, rows.get(d.position, -1)))
            done += len(batch.items) + len(batch.failed) + len(batch.skipped)
        yield items, (np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, clip.dim), np.float32))


class _Replay:
    """Rank 0's copy of additions.ingest's bookkeeping, fed the gathered results in single-process order."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.report = AddReport()
        self.seen: set[str] = set()
        self.repeats: list[tuple[str, str]] = []
        self.pending: list[PendingImage] = []

    def batch(self, items: list[_Item], vectors: dict[int, np.ndarray]) -> None:
        """One --batch-size slice of the accepted list, as embed_sources would have yielded it."""
        from .ingest import Decoded

        plan, report = self.plan, self.report
        ok = [d for d in items if d.error is None]
        report.failed.extend((plan.name_of(d.position), d.error or "failed") for d in items if d.error is not None)
        drop: set[int] = set()
        if ok:
            known = plan.target.ids_by_hash([d.sha256 for d in ok])
            for d in ok:
                if d.sha256 in known:
                    report.duplicates.append((plan.name_of(d.position), known[d.sha256]))
                    drop.add(d.position)
                elif d.sha256 in self.seen:
                    self.repeats.append((plan.name_of(d.position), d.sha256))
                    drop.add(d.position)
                else:
                    self.seen.add(d.sha256)
        for d in ok:
            if d.position in drop:
                continue
            if d.position not in vectors:
                raise IndexStoreError(f"internal error: no embedding came back for input {plan.name_of(d.position)}")
            decoded = Decoded(position=d.position, sha256=d.sha256, width=d.width, height=d.height)
            self.pending.append(plan.pending_for(decoded, vectors[d.position]))
        if len(self.pending) >= (plan.options.commit_every or max(MIN_COMMIT_EVERY, plan.target.size())):
            self.commit()

    def commit(self) -> None:
        if self.pending:
            self.report.merge(self.plan.target.commit(self.pending))
            self.pending = []

    def finish(self) -> AddReport:
        self.commit()
        if self.repeats:  # point each repeat at the id its first copy received
            ids = self.plan.target.ids_by_hash([h for _, h in self.repeats])
            self.report.duplicates.extend((name, ids.get(h, -1)) for name, h in self.repeats)
        report = self.plan.report
        report.merge(self.report)
        return report


@dataclass
class _Round:
    """Rank 0's view of one round: the gathered items by position, and their vectors."""

    items: dict[int, _Item] = field(default_factory=dict)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)

    def add(self, items: list[_Item], vectors: np.ndarray) -> None:
        for it in items:
            self.items[it.position] = it
            if it.row >= 0:
                self.vectors[it.position] = vectors[it.row]


def build(args: argparse.Namespace) -> int:
    """cmd_build for WORLD_SIZE > 1 (torchrun): same index and report as one process would make."""
    info, device = init_distributed(args.device)
    try:
        return _build(args, info, device)
    except _Stop:  # rank 0 prints why and exits with 2, which fails the job; exiting first here (non-zero) would
        return 0  # make torchrun stop rank 0 before it has said why
    finally:
        shutdown_distributed()


def _build(args: argparse.Namespace, info: DistInfo, device: torch.device) -> int:
    from .cli import _load_clip, _print_report

    error, clip, inputs = None, None, None
    try:  # step 1, every rank: the checkpoint on its device and the listing (rank 0 first checks --out)
        if info.is_main:
            _check_out(args)
        clip = _load_clip(args.checkpoint, None, device=str(device), max_pixels=args.max_pixels, precision=args.precision)
        inputs = _list_inputs(args)
    except Exception as exc:  # noqa: BLE001 - told to every rank, reported by rank 0
        error = _message(exc)
    seen = _agree(info, (inputs.digest, len(inputs.sources), clip.model_id) if error is None else None, error)
    if info.is_main and len(set(seen)) > 1:
        differ = [r for r, s in enumerate(seen) if s != seen[0]]
        error = (f"rank(s) {differ} see other inputs or another checkpoint than rank 0 ({seen[0][1]} inputs); "
                 "every node must read the same --images/--data and --checkpoint")

    plan: _Plan | None = None
    started = time.perf_counter()
    if info.is_main and error is None:  # step 2, rank 0: create the index and choose the accepted inputs
        try:
            assert clip is not None and inputs is not None
            plan = _plan(args, clip, inputs)
        except Exception as exc:  # noqa: BLE001
            error = _message(exc)
    mine = (error, None) if error is not None else (None, np.packbits(plan.accepted)) if plan is not None else None
    decided = _broadcast(info, mine)  # rank 0's verdict and mask; the others' `mine` is ignored
    if decided[0] is not None:
        if info.is_main:
            raise IndexStoreError(decided[0])
        raise _Stop
    assert clip is not None and inputs is not None
    mask = np.unpackbits(decided[1], count=len(inputs.sources)).astype(bool)
    sources = [s for s, keep in zip(inputs.sources, mask) if keep]
    if plan is not None:
        print(f"indexing {inputs.source_text} into {args.out} on {info.world_size} processes", file=sys.stderr)
    del inputs  # the accepted list is all that is needed from here
    # The batch size decides the replay's slices (and the bytes path its own options): every rank uses rank 0's.
    options = _broadcast(info, plan.options if plan is not None else None)

    # step 3: rounds. Each covers W * per_round consecutive accepted inputs, a whole number of batches.
    per_round = ROUND_BATCHES * options.batch_size
    span = per_round * info.world_size
    rounds = -(-len(sources) // span)
    replay = _Replay(plan) if plan is not None else None
    try:
        work = _rank_rounds(clip, sources, info, options, rounds, per_round)
        for k in range(rounds):
            error = None
            try:
                payload: Any = next(work)
            except Exception as exc:  # noqa: BLE001
                payload, error = None, _message(exc)
            gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
            dist.gather_object((error, payload), gathered, dst=0)
            verdict = None
            if replay is not None and gathered is not None:
                failures = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
                if failures:
                    verdict = failures[0][1] if failures[0][0] == 0 else f"rank {failures[0][0]}: {failures[0][1]}"
                else:
                    try:
                        this = _Round()
                        for _, (items, vectors) in gathered:
                            this.add(items, vectors)
                        lo, hi = k * span, min((k + 1) * span, len(sources))
                        for start in range(lo, hi, options.batch_size):
                            positions = range(start, min(start + options.batch_size, hi))
                            missing = [p for p in positions if p not in this.items]
                            if missing:
                                raise IndexStoreError(f"internal error: no rank reported accepted input #{missing[0]}")
                            replay.batch([this.items[p] for p in positions], this.vectors)
                    except Exception as exc:  # noqa: BLE001
                        verdict = _message(exc)
                del gathered
            verdict = _broadcast(info, verdict)
            if verdict is not None:
                if info.is_main:
                    raise IndexStoreError(verdict)
                raise _Stop
        work.close()
        if replay is None:
            return 0
        report = replay.finish()
        _print_report(report, time.perf_counter() - started)
        count = len(replay.plan.idx)
        print(f"index {args.out}: {count} image(s), type {replay.plan.idx.index_type}")
        return 0 if count else 1
    finally:
        if plan is not None:
            plan.idx.close()
