"""The engines of bench/index_peers.py and the worker loop each runs in its own process.

Each engine builds over <dir>/base.npy and answers timed query runs on stdin, one JSON line per
command, its answers marked with MARK on stdout (a library's own prints are skipped). This module
imports only numpy at the top, so it loads in the peers' venv as well as in clipforge's.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
K = 10
MARK = "@@ "  # a worker's protocol lines; anything else a library prints on stdout is skipped

def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _reply(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


IVF_NPROBES = (4, 8, 12, 14, 16, 20, 24, 32, 48, 64)  # clipforge's ivfpq knob (its default nprobe is 24)


class ClipforgeEngine:
    """ImageIndex.create + add_embeddings; search_by_vector one query at a time."""

    FAISS_ONLY = "faiss-only "  # a setting's prefix: the snapshot's FAISS index searched directly

    def __init__(self, kind: str, folder: Path, faiss_only: bool) -> None:
        import faiss

        sys.path.insert(0, str(ROOT))
        from index import ImageIndex, NewImage, backends

        self.faiss, self.backends, self.kind, self.folder, self.faiss_only = faiss, backends, kind, folder, faiss_only
        self._create, self._new_image = ImageIndex.create, NewImage

    def inputs(self, n: int) -> Any:
        return [self._new_image(f"v/{i}.jpg", f"{i:064x}", 224, 224) for i in range(n)]

    def build(self, xb: np.ndarray, images: Any, ef: Sequence[int]) -> dict:
        from index import store

        self.faiss.omp_set_num_threads(2)
        self.index = self._create(self.folder / f"index-{self.kind}", "index-peers-bench", dim=xb.shape[1],
                                  index_type=self.kind)
        added = self.index.add_embeddings(xb, images).added
        self.first = added[0]
        if added != list(range(self.first, self.first + len(xb))):
            raise RuntimeError("add_embeddings did not hand out consecutive ids")
        self.faiss.omp_set_num_threads(1)
        gen = self.index.directory / store.gen_name(self.index.generation)
        resolved = self.index.index_type
        if resolved in ("hnsw", "hnswsq"):
            settings = [f"ef={e}" for e in ef]
        elif resolved == "ivfpq":
            settings = [f"nprobe={p}" for p in IVF_NPROBES]
        else:
            settings = ["exact"]
        settings += [self.FAISS_ONLY + s for s in settings] if self.faiss_only else []
        return {"resolved_type": resolved, "params": self.index.manifest.params,
                "index_file_bytes": (gen / store.FAISS_FILE).stat().st_size, "settings": settings,
                "versions": {"faiss": self.faiss.__version__}}

    def search(self, q: np.ndarray, setting: str) -> list[int]:
        knob = setting.removeprefix(self.FAISS_ONLY)
        ef = int(knob.split("=")[1]) if knob.startswith("ef=") else None
        nprobe = int(knob.split("=")[1]) if knob.startswith("nprobe=") else None
        if setting.startswith(self.FAISS_ONLY):  # what search_snapshot calls, without metadata and results
            st = self.index._state
            _, ids = self.backends.search(st.index, st.manifest.index_type, q[None, :], K, st.manifest.params,
                                          st.tombstones, ef, nprobe, st.half_scan)
            return [int(i) - self.first for i in ids[0]]
        hits = self.index.search_by_vector(q[None, :], K, ef_search=ef, nprobe=nprobe)[0]
        return [r.id - self.first for r in hits]


class HnswlibEngine:
    def __init__(self, m: int, ef_construction: int) -> None:
        import hnswlib

        self.lib, self.m, self.efc = hnswlib, m, ef_construction

    def inputs(self, n: int) -> Any:
        return np.arange(n, dtype=np.int64)

    def build(self, xb: np.ndarray, ids: Any, ef: Sequence[int]) -> dict:
        self.index = self.lib.Index(space="ip", dim=xb.shape[1])
        self.index.init_index(max_elements=len(xb), ef_construction=self.efc, M=self.m)
        self.index.add_items(xb, ids, num_threads=2)
        self.index.set_num_threads(1)
        return {"params": {"M": self.m, "ef_construction": self.efc}, "settings": [f"ef={e}" for e in ef],
                "versions": {"hnswlib": _version("hnswlib")}}

    def search(self, q: np.ndarray, setting: str) -> list[int]:
        ef = max(int(setting.split("=")[1]), K)
        if ef != getattr(self, "_ef", None):
            self.index.set_ef(ef)
            self._ef = ef
        labels, _ = self.index.knn_query(q[None, :], k=K, num_threads=1)
        return labels[0].tolist()


class UsearchEngine:
    def __init__(self, dtype: str, connectivity: int, expansion_add: int) -> None:
        from usearch.index import Index

        self.version, self.cls = _version("usearch"), Index
        self.dtype, self.conn, self.exp_add = dtype, connectivity, expansion_add

    def inputs(self, n: int) -> Any:
        return np.arange(n, dtype=np.uint64)

    def build(self, xb: np.ndarray, keys: Any, ef: Sequence[int]) -> dict:
        self.index = self.cls(ndim=xb.shape[1], metric="ip", dtype=self.dtype, connectivity=self.conn,
                              expansion_add=self.exp_add)
        self.index.add(keys, xb, threads=2)
        return {"params": {"connectivity": self.conn, "expansion_add": self.exp_add, "dtype": self.dtype},
                "settings": [f"ef={e}" for e in ef], "versions": {"usearch": str(self.version)}}

    def search(self, q: np.ndarray, setting: str) -> list[int]:
        ef = int(setting.split("=")[1])
        if ef != getattr(self, "_ef", None):
            self.index.expansion_search = ef
            self._ef = ef
        return self.index.search(q, K, threads=1).keys.tolist()


class AutofaissEngine:
    """autofaiss.build_index at a memory budget; its own tuned parameters, then its main knob swept."""

    def __init__(self, budget_bytes: int, memory_available: str, query_ms: float) -> None:
        import autofaiss
        import faiss

        self.autofaiss, self.faiss = autofaiss, faiss
        self.budget, self.available, self.query_ms = budget_bytes, memory_available, query_ms
        self.shims = self._opq_shim(faiss)

    @staticmethod
    def _opq_shim(faiss: Any) -> list[str]:
        """autofaiss 2.18 calls faiss.OPQMatrix(d, M=..., d2=...); FAISS since renamed M to M_in, so its OPQ
        indexes fail with "OPQMatrix.__init__() got an unexpected keyword argument 'M'". Where that
        is so, the name is mapped through (the same FAISS clipforge runs, not an older one)."""
        try:
            faiss.OPQMatrix(8, M=2)
            return []
        except TypeError:
            pass
        original = faiss.OPQMatrix

        class OPQMatrix(original):  # type: ignore[misc, valid-type]
            def __init__(self, d: int = 0, M: int = 1, d2: int = -1) -> None:  # autofaiss's keyword
                super().__init__(d, M, d2)

        faiss.OPQMatrix = OPQMatrix
        return ["faiss.OPQMatrix(d, M=, d2=) mapped to M_in (autofaiss 2.18 against faiss >= the rename)"]

    def inputs(self, n: int) -> Any:
        return None

    def build(self, xb: np.ndarray, _: Any, ef: Sequence[int]) -> dict:
        import re

        budget = f"{max(1, self.budget // 2**20)}M"
        index, infos = self.autofaiss.build_index(
            embeddings=xb, save_on_disk=False, metric_type="ip", max_index_memory_usage=budget,
            current_memory_available=self.available, max_index_query_time_ms=self.query_ms,
            min_nearest_neighbors_to_retrieve=K, nb_cores=2, verbose=20,
        )
        if index is None:
            raise RuntimeError(f"autofaiss.build_index built nothing at max_index_memory_usage={budget}")
        self.index, self.space = index, self.faiss.ParameterSpace()
        self.faiss.omp_set_num_threads(1)
        infos = {k: (v if isinstance(v, (int, float, str, type(None))) else str(v)) for k, v in (infos or {}).items()}
        key = str(infos.get("index_key", ""))
        tuned = str(infos.get("index_param", "") or "")
        settings = [f"tuned:{tuned}"]
        if "IVF" in key:
            nlist = int(re.findall(r"IVF(\d+)", key)[0])
            extra = ",ht=2048" if "PQ" in key else ""
            hnsw = "_HNSW" in key
            for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
                if p <= nlist:
                    settings.append(f"nprobe={p}" + (f",efSearch={max(2 * p, 16)}" if hnsw else "") + extra)
        elif "HNSW" in key:
            settings += [f"efSearch={e}" for e in ef]
        return {"index_key": key, "tuned_param": tuned, "max_index_memory_usage": budget,
                "current_memory_available": self.available, "max_index_query_time_ms": self.query_ms,
                "infos": infos, "settings": settings, "shims": self.shims,
                "versions": {"autofaiss": _version("autofaiss"), "faiss": self.faiss.__version__}}

    def search(self, q: np.ndarray, setting: str) -> list[int]:
        if setting != getattr(self, "_setting", None):
            params = setting.split(":", 1)[1] if setting.startswith("tuned:") else setting
            if params:
                self.space.set_index_parameters(self.index, params)
            self._setting = setting
        _, ids = self.index.search(q[None, :], K)
        return ids[0].tolist()


def make_engine(name: str, args: argparse.Namespace, folder: Path) -> Any:
    if name.startswith("clipforge-"):
        return ClipforgeEngine(name.split("-", 1)[1], folder, args.faiss_only)
    if name == "hnswlib":
        return HnswlibEngine(args.m, args.ef_construction)
    if name.startswith("usearch-"):
        return UsearchEngine(name.split("-", 1)[1], args.m, args.ef_construction)
    if name == "autofaiss":
        return AutofaissEngine(args.budget_bytes, args.memory_available, args.autofaiss_query_ms)
    raise ValueError(f"unknown engine {name}")


def worker(args: argparse.Namespace) -> None:
    """Build one engine over <dir>/base.npy, report, then answer run commands on stdin until quit."""
    folder = Path(args.dir)
    try:
        engine = make_engine(args.worker, args, folder)
        xq = np.load(folder / "queries.npy")
        xb = np.load(folder / "base.npy")
        extra = engine.inputs(len(xb))
        gc.collect()
        rss0, anon0 = _status_mib("VmRSS"), _status_mib("RssAnon")
        t0, c0 = time.perf_counter(), time.process_time()
        info = engine.build(xb, extra, args.ef)
        build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        gc.collect()
        rss, anon, hwm = _status_mib("VmRSS") - rss0, _status_mib("RssAnon") - anon0, _status_mib("VmHWM") - rss0
        del xb, extra
        gc.collect()
    except BaseException as exc:  # reported to the orchestrator, which carries on without this engine
        import traceback

        traceback.print_exc()
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        _reply({"event": "error", "error": f"{type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno})"})
        raise SystemExit(1) from exc
    _reply({"event": "built", "build_s": build_s, "build_cpu_s": build_cpu_s, "rss_mib": rss, "anon_mib": anon,
            "peak_mib": hwm, **info})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        setting, ids, times = cmd["setting"], [], []
        try:
            for q in xq:
                t = time.perf_counter()
                found = engine.search(q, setting)
                times.append(time.perf_counter() - t)
                ids.append(found)
        except Exception as exc:  # noqa: BLE001 - a setting the engine refuses: reported, the others still run
            _reply({"error": f"{type(exc).__name__}: {exc}"})
            continue
        _reply({"times": times, **({"ids": ids} if cmd.get("ids") else {})})


