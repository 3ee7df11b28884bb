"""Hand back the pages of a memory-mapped index file that reading it touched.

Reading an index mapped (IO_FLAG_MMAP_IFC) copies its lists' codes and ids out of the mapping
into memory, and the pages they were copied from stay mapped: at 10M vectors 1.4 GiB counted
twice in the service's resident set. MADV_DONTNEED on the shared, read-only mapping unmaps them;
the page cache keeps the file's data, so a later touch of the float16 rows is a page fault, not a
change. Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
from pathlib import Path


@functools.cache
def _libc_madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def shared_read_only_mappings(path: Path) -> list[tuple[int, int]]:
    """(start, end) of this process's shared, read-only mappings of `path`, by device and inode or by name.

    The name covers overlay file systems, whose maps show the inode of the layer beneath. Private
    or writable mappings are left out: dropping their pages could drop data.
    """
    st, name = os.stat(path), str(Path(path).resolve())
    found = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) < 6 or fields[1][1] != "-" or fields[1][3] != "s":
                continue
            major, minor = (int(part, 16) for part in fields[3].split(":"))
            if (int(fields[4]), os.makedev(major, minor)) == (st.st_ino, st.st_dev) or fields[5] == name:
                start, end = (int(part, 16) for part in fields[0].split("-"))
                found.append((start, end))
    return found


def release_touched_pages(path: Path) -> int:
    """Unmap the resident pages of `path`'s shared read-only mappings; how many mappings (0 off Linux)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    madvise = _libc_madvise()
    return sum(madvise(start, end - start, mmap.MADV_DONTNEED) == 0 for start, end in shared_read_only_mappings(path))


class RowPrefetch:
    """Reads the float16 rows a mapped, re-ranked query will score all at once, before it scores them.

    FAISS's re-ranking touches its ~80 candidate rows one after another, so on a cold page cache
    a query waits for 80 disk reads in turn (4.7 ms p50 at 10M here, docs/benchmarks.md). Finding the
    candidates first with the index's own coarse search and asking for their pages with
    MADV_WILLNEED lets the disk serve them in parallel; the search that follows is unchanged,
    so a wrong or late hint costs time, never a result.
    """

    def __init__(self, index, refined, storage) -> None:
        self._index = index  # keeps the mapping alive as long as the addresses are used
        self.base = refined.base_index
        self.row_bytes = int(storage.code_size)
        self.rows = int(storage.ntotal)
        self.address = int(storage.codes.data())
        self.page = mmap.PAGESIZE

    @classmethod
    def for_index(cls, index, *, mapped: bool) -> RowPrefetch | None:
        """A prefetcher when `index` is an id map over an IndexRefine whose float16 rows lie in a file
        mapping, else None. A writer's in-memory copy of a mapped index owns its rows: a hint would only
        cost a search.
        """
        if not (mapped and sys.platform.startswith("linux") and hasattr(mmap, "MADV_WILLNEED")):
            return None
        import faiss

        outer = faiss.downcast_index(index)
        refined = faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexIDMap) else None
        if not isinstance(refined, faiss.IndexRefine):
            return None
        storage = faiss.downcast_index(refined.refine_index)
        if not isinstance(storage, faiss.IndexScalarQuantizer) or storage.codes.is_owned:
            return None
        return cls(index, refined, storage)

    def __call__(self, queries, candidates: int, params) -> int:
        """Advise the pages of each query's `candidates` nearest rows by the coarse codes; how many ranges."""
        import numpy as np

        _, positions = self.base.search(queries, candidates, params=params)
        positions = np.unique(positions[(positions >= 0) & (positions < self.rows)])
        starts = (self.address + positions * self.row_bytes) // self.page * self.page
        ends = self.address + (positions + 1) * self.row_bytes
        madvise = _libc_madvise()
        for start, end in zip(starts.tolist(), ends.tolist()):
            madvise(start, end - start, mmap.MADV_WILLNEED)
        return len(starts)
