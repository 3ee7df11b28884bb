"""ANN peers (issue 14, section 2): clipforge's index against hnswlib, usearch and autofaiss's choice.

One run, the same base vectors and queries for every engine, each engine in its own fresh
subprocess (so its resident memory is its own): clipforge through ImageIndex.create +
add_embeddings (types hnsw, hnswsq and auto), queried through ImageIndex.search_by_vector
one query at a time; hnswlib (M 32, ef_construction 200, sweeping ef); usearch HNSW
(connectivity 32, expansion_add 200, sweeping expansion_search) with f32 and f16 storage;
and the index autofaiss.build_index picks (clip-retrieval builds with it) with
max_index_memory_usage set to the size of clipforge's hnswsq index, which tunes its own
search parameters for a maximum query time (its choice is reported, and its main knob swept).
Builds get 2 threads, queries 1 (FAISS via omp_set_num_threads, hnswlib and usearch by
their threads arguments). Per engine and setting: build seconds, resident memory of the built
index (VmRSS growth of its process over the build, inputs still held), recall@10 against exact
search, p50/p99 latency of single queries. Builds run one after another, so on a shared machine
their wall seconds carry whatever else ran then; the process CPU seconds of each build are given
beside them. The timed runs alternate between clipforge and the
peers (ours, peer, ours, peer, the order rotating each round), so noise from other jobs on a
shared machine falls on all alike. Then, for recall targets 0.95/0.98/0.99, the fastest
setting of each engine that reaches it.

clipforge's `import index` pulls model/ and so torch: its workers run on .venv/bin/python, the
peers on the bench-only .venv-indexpeers (bench/index_peers_venv.sh builds it); vectors travel
as .npy files in a temporary folder. A peer that cannot be imported or built (or not within
--build-timeout) is reported with its error, its log kept beside the JSON, and the others are
still measured (what autofaiss did here: docs/benchmarks.md).

Data: bench/index_bench.py's unit_vectors(n, 512, seed 0, intrinsic=32) (near a 32-d subspace),
queries a separate draw (seed 1); --data realistic uses index_bench.realistic_vectors only
where its cache (.cache/index_bench, a trained model's embeddings) already exists, never builds it.

    bash bench/index_peers_venv.sh                               # once: the peers' environment
    nice -n 5 .venv/bin/python bench/index_peers.py              # 100k x 512, 500 queries
    nice -n 5 .venv/bin/python bench/index_peers.py --sizes 100000 200000
    .venv/bin/python bench/index_peers.py --sizes 5000 --queries 50 --ef 16 64 --rounds 1   # quick
Prints a table and writes bench/results/index_peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from index_peer_engines import MARK, ClipforgeEngine, K, worker

ROOT = Path(__file__).resolve().parents[1]
OURS_PYTHON = ROOT / ".venv" / "bin" / "python"
PEER_PYTHON = ROOT / ".venv-indexpeers" / "bin" / "python"
RESULTS = ROOT / "bench" / "results" / "index_peers.json"
RECALL_TARGETS = (0.95, 0.98, 0.99)
# engine -> (which interpreter, family); clipforge's first: autofaiss's budget is the size of the first clipforge index built
ENGINES: dict[str, tuple[str, str]] = {
    "clipforge-hnsw": ("ours", "clipforge"),
    "clipforge-hnswsq": ("ours", "clipforge"),
    "clipforge-auto": ("ours", "clipforge"),
    "clipforge-ivfpq": ("ours", "clipforge"),
    "hnswlib": ("peer", "hnswlib"),
    "usearch-f32": ("peer", "usearch"),
    "usearch-f16": ("peer", "usearch"),
    "autofaiss": ("peer", "autofaiss"),
}


# ---------------------------------------------------------------------------------------------- pure helpers
def percentiles_ms(seconds: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    arr = np.asarray(seconds, dtype=np.float64) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def recall_at_k(found: Sequence[Sequence[int]], truth: np.ndarray) -> float:
    """Mean share of each query's true top k among the ids found (missing results count as misses)."""
    k = truth.shape[1]
    return float(np.mean([len({int(i) for i in f[:k]} & set(t.tolist())) / k for f, t in zip(found, truth)]))


def fastest_per_target(rows: Sequence[dict], targets: Sequence[float] = RECALL_TARGETS) -> list[dict]:
    """For each target and engine, the setting with the lowest p50 among those reaching the target.

    Rows marked faiss_only (clipforge's FAISS index searched directly, to show the cost of the
    service path around it) are left out: the comparison is of search_by_vector.

    An engine that reaches no setting at a target gets a row with setting None, so a missing
    peer reads as "not reached", not as absent from the comparison.
    """
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    out = []
    for target in targets:
        for engine in engines:
            ok = [r for r in rows if r["engine"] == engine and r["recall@10"] >= target and not r.get("faiss_only")]
            best = min(ok, key=lambda r: (r["p50_ms"], r["p99_ms"])) if ok else None
            out.append({
                "target": target, "engine": engine, "setting": best["setting"] if best else None,
                "recall@10": best["recall@10"] if best else None, "p50_ms": best["p50_ms"] if best else None,
                "p99_ms": best["p99_ms"] if best else None, "build_s": best["build_s"] if best else None,
                "build_cpu_s": best.get("build_cpu_s") if best else None,
                "rss_mib": best["rss_mib"] if best else None,
            })
    return out


def verdicts(summary: Sequence[dict], family_of: dict[str, str]) -> list[dict]:
    """Per target, the goal of issue 14: clipforge's fastest engine against the peers.

    p50: clipforge's lowest p50 reaching the target against the lowest of any peer reaching it.
    Build: the build seconds of that clipforge engine against the fastest build of any peer
    reaching the target (the strict reading of "no slower than the best of them").
    """
    out = []
    for target in dict.fromkeys(s["target"] for s in summary):
        reached = [s for s in summary if s["target"] == target and s["setting"] is not None]
        ours = [s for s in reached if family_of[s["engine"]] == "clipforge"]
        peers = [s for s in reached if family_of[s["engine"]] != "clipforge"]
        best_ours = min(ours, key=lambda s: s["p50_ms"]) if ours else None
        best_peer = min(peers, key=lambda s: s["p50_ms"]) if peers else None
        fastest_build = min(s["build_s"] for s in peers) if peers else None
        both = best_ours is not None and best_peer is not None
        out.append({
            "target": target,
            "clipforge": best_ours and f"{best_ours['engine']} {best_ours['setting']}",
            "clipforge_p50_ms": best_ours and best_ours["p50_ms"],
            "best_peer": best_peer and f"{best_peer['engine']} {best_peer['setting']}",
            "peer_p50_ms": best_peer and best_peer["p50_ms"],
            "p50_goal_met": best_ours["p50_ms"] <= best_peer["p50_ms"] if both else None,
            "clipforge_build_s": best_ours and best_ours["build_s"],
            "fastest_peer_build_s": fastest_build,
            "build_goal_met": best_ours["build_s"] <= fastest_build if both else None,
        })
    return out


def interleaved(ours: Sequence[Any], peers: Sequence[Any], round_index: int) -> list[Any]:
    """ours[0], peers[0], ours[1], peers[1], ... (the longer list's tail at the end), rotated by the round.

    Both lists are rotated before zipping so each round's pairings and positions differ.
    """
    def rot(xs: Sequence[Any]) -> list[Any]:
        xs = list(xs)
        return xs[round_index % len(xs):] + xs[:round_index % len(xs)] if xs else []

    a, b = rot(ours), rot(peers)
    out: list[Any] = []
    for i in range(max(len(a), len(b))):
        out += ([a[i]] if i < len(a) else []) + ([b[i]] if i < len(b) else [])
    return out


# ---------------------------------------------------------------------------------------------- orchestrator
class Worker:
    """One engine's process and its line protocol."""

    def __init__(self, name: str, python: Path, folder: Path, args: argparse.Namespace, budget_bytes: int) -> None:
        self.name, self.log_path = name, folder / f"{name}.log"
        cmd = [str(python), str(Path(__file__).resolve()), "--worker", name, "--dir", str(folder),
               "--ef", *map(str, args.ef), "--m", str(args.m), "--ef-construction", str(args.ef_construction),
               "--budget-bytes", str(budget_bytes), "--memory-available", args.memory_available,
               "--autofaiss-query-ms", str(args.autofaiss_query_ms), "--faiss-only" if args.faiss_only else "--no-faiss-only"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
        self.log = open(self.log_path, "w")  # noqa: SIM115 - the worker's stderr for its whole life, closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env, cwd=str(ROOT))

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer in {timeout:.0f}s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}): {self.stderr_tail()}")
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])

    def ask(self, cmd: dict, timeout: float) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def stderr_tail(self) -> str:
        self.log.flush()
        lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else "(no output)"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def vectors(args: argparse.Namespace, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    sys.path.insert(0, str(ROOT / "bench"))
    import index_bench

    if args.data == "realistic":
        import realistic_vectors as rv

        needed = [rv.CACHE / "model" / "last" / "model.safetensors",
                  *(rv.CACHE / f"{name}.f16.npy" for name in ("real_base", "real_queries"))]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:  # building it trains a model for minutes: never done here
            raise SystemExit(f"--data realistic needs the cache of bench/realistic_vectors.py; missing: {', '.join(missing)}")
        return index_bench.realistic_vectors(n, args.queries)
    xb = index_bench.unit_vectors(n, args.dim, seed=args.base_seed, intrinsic=args.intrinsic_dim)
    xq = index_bench.unit_vectors(args.queries, args.dim, seed=args.query_seed, intrinsic=args.intrinsic_dim)
    return xb, xq, f"unit vectors near a {args.intrinsic_dim}-d subspace (base seed {args.base_seed}, queries seed {args.query_seed})"


def exact_top_k(xb: np.ndarray, xq: np.ndarray) -> np.ndarray:
    import faiss

    faiss.omp_set_num_threads(2)
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(np.ascontiguousarray(xb, dtype=np.float32))
    return flat.search(np.ascontiguousarray(xq, dtype=np.float32), K)[1]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], check=False, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def bench_size(args: argparse.Namespace, n: int) -> dict:
    xb, xq, data = vectors(args, n)
    print(f"\n== {n:,} x {xb.shape[1]}, {len(xq)} queries: {data} ==", flush=True)
    truth = exact_top_k(xb, xq)
    scratch = ROOT / ".cache" / "index_peers"
    scratch.mkdir(parents=True, exist_ok=True)
    run: dict[str, Any] = {"n": n, "dim": int(xb.shape[1]), "queries": len(xq), "data": data, "engines": {}, "rows": []}
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        folder = Path(tmp)
        np.save(folder / "base.npy", np.ascontiguousarray(xb, dtype=np.float32))
        np.save(folder / "queries.npy", np.ascontiguousarray(xq, dtype=np.float32))
        del xb
        workers: dict[str, Worker] = {}
        budget = args.autofaiss_budget_bytes
        try:
            for name in args.engines:
                side, _ = ENGINES[name]
                python = OURS_PYTHON if side == "ours" else PEER_PYTHON
                if not python.exists():
                    run["engines"][name] = {"error": f"{python} does not exist (bash bench/index_peers_venv.sh)"}
                    print(f"{name}: UNAVAILABLE: {run['engines'][name]['error']}", flush=True)
                    continue
                if name == "autofaiss" and not budget:
                    run["engines"][name] = {"error": "no clipforge build to take the memory budget from"}
                    print(f"{name}: skipped: {run['engines'][name]['error']}", flush=True)
                    continue
                w = Worker(name, python, folder, args, budget)
                try:
                    info = w.read(args.build_timeout)
                except (RuntimeError, TimeoutError) as exc:
                    info = {"event": "error", "error": str(exc)}
                if info.get("event") != "built":
                    w.close()
                    kept = args.out.parent / f"index_peers-{name}.log"  # the temporary folder goes; its log stays
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(w.log_path, kept)
                    run["engines"][name] = {"error": info["error"], "log": str(kept)}
                    print(f"{name}: FAILED: {info['error']} (its log: {kept})", flush=True)
                    continue
                info.pop("event")
                run["engines"][name] = info
                workers[name] = w
                if ENGINES[name][1] == "clipforge" and not budget:
                    budget = int(info["index_file_bytes"])
                    run["autofaiss_budget_from"] = name
                extra = f" -> {info['resolved_type']}" if "resolved_type" in info else ""
                extra += f" index_key={info['index_key']} tuned={info['tuned_param']!r}" if "index_key" in info else ""
                print(f"{name}{extra}: built in {info['build_s']:.1f}s ({info['build_cpu_s']:.0f} CPU s), +{info['rss_mib']:.0f} MiB RSS "
                      f"(peak +{info['peak_mib']:.0f})", flush=True)
            # untimed pass: recall, and warms every setting
            recall: dict[tuple[str, str], float] = {}
            for name, w in workers.items():
                for setting in run["engines"][name]["settings"]:
                    ans = w.ask({"op": "run", "setting": setting, "ids": True}, args.query_timeout)
                    if "error" in ans:
                        run["engines"][name].setdefault("setting_errors", {})[setting] = ans["error"]
                        print(f"{name} {setting}: FAILED: {ans['error']}", flush=True)
                        continue
                    recall[(name, setting)] = recall_at_k(ans["ids"], truth)
            times: dict[tuple[str, str], list[float]] = {key: [] for key in recall}
            ours = [key for key in recall if ENGINES[key[0]][1] == "clipforge"]
            peers = [key for key in recall if ENGINES[key[0]][1] != "clipforge"]
            for r in range(args.rounds):
                for name, setting in interleaved(ours, peers, r):
                    times[(name, setting)] += workers[name].ask({"op": "run", "setting": setting}, args.query_timeout)["times"]
                print(f"  timed round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for w in workers.values():
                w.close()
    for (name, setting), ts in times.items():
        p50, p99 = percentiles_ms(ts)
        info = run["engines"][name]
        run["rows"].append({
            "engine": name, "setting": setting, "build_s": round(info["build_s"], 2),
            "build_cpu_s": round(info["build_cpu_s"], 1), "rss_mib": round(info["rss_mib"], 1),
            "recall@10": round(recall[(name, setting)], 4), "p50_ms": round(p50, 4), "p99_ms": round(p99, 4),
            "samples": len(ts), **({"faiss_only": True} if setting.startswith(ClipforgeEngine.FAISS_ONLY) else {}),
        })
    run["summary"] = fastest_per_target(run["rows"])
    run["verdicts"] = verdicts(run["summary"], {e: f for e, (_, f) in ENGINES.items()})
    return run


def print_run(run: dict) -> None:
    print(f"\n{run['n']:,} x {run['dim']}, {run['queries']} queries, {run['data']}")
    print(f"{'engine':18s} {'setting':34s} {'build s':>8s} {'CPU s':>6s} {'RSS MiB':>8s} {'recall@10':>9s} "
          f"{'p50 ms':>8s} {'p99 ms':>8s}")
    for r in run["rows"]:
        print(f"{r['engine']:18s} {r['setting'][:34]:34s} {r['build_s']:8.1f} {r['build_cpu_s']:6.0f} {r['rss_mib']:8.0f} "
              f"{r['recall@10']:9.4f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f}")
    for name, info in run["engines"].items():
        if "error" in info:
            print(f"{name:18s} UNAVAILABLE: {info['error']}")
    print("\nfastest setting reaching each recall@10 target:")
    print(f"{'target':>6s} {'engine':18s} {'setting':34s} {'recall':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'build s':>8s} "
          f"{'CPU s':>6s}")
    for s in run["summary"]:
        if s["setting"] is None:
            print(f"{s['target']:6.2f} {s['engine']:18s} {'(not reached)':34s}")
        else:
            print(f"{s['target']:6.2f} {s['engine']:18s} {s['setting'][:34]:34s} {s['recall@10']:7.4f} "
                  f"{s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {s['build_s']:8.1f} {s['build_cpu_s']:6.0f}")
    for v in run["verdicts"]:
        print(f"recall>={v['target']}: clipforge {v['clipforge']} p50 {v['clipforge_p50_ms']} ms vs best peer "
              f"{v['best_peer']} p50 {v['peer_p50_ms']} ms -> p50 goal {v['p50_goal_met']}; build "
              f"{v['clipforge_build_s']} s vs fastest peer build {v['fastest_peer_build_s']} s -> build goal "
              f"{v['build_goal_met']}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--intrinsic-dim", type=int, default=32)
    p.add_argument("--base-seed", type=int, default=0)
    p.add_argument("--query-seed", type=int, default=1)
    p.add_argument("--data", choices=("structured", "realistic"), default="structured")
    p.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    p.add_argument("--ef", type=int, nargs="+", default=[16, 32, 48, 64, 96, 128, 192, 256],
                   help="ef_search / ef / expansion_search values swept on every HNSW")
    p.add_argument("--m", type=int, default=32, help="hnswlib M and usearch connectivity (clipforge's default is 32)")
    p.add_argument("--ef-construction", type=int, default=200, help="hnswlib ef_construction and usearch expansion_add")
    p.add_argument("--rounds", type=int, default=2, help="timed passes over the queries per setting")
    p.add_argument("--autofaiss-query-ms", type=float, default=10.0, help="autofaiss max_index_query_time_ms")
    p.add_argument("--autofaiss-budget-bytes", type=int, default=0,
                   help="autofaiss max_index_memory_usage (default: the size of clipforge's hnswsq index file)")
    p.add_argument("--memory-available", default=None, help="autofaiss current_memory_available (default: MemAvailable - 2 GiB)")
    p.add_argument("--faiss-only", action=argparse.BooleanOptionalAction, default=True,
                   help="also time clipforge's FAISS index searched directly (rows marked faiss-only, not in the summary)")
    p.add_argument("--build-timeout", type=float, default=1800.0)
    p.add_argument("--query-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", choices=list(ENGINES), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--budget-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_available is None:
        with open("/proc/meminfo") as fh:
            avail_kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
        args.memory_available = f"{max(1024, avail_kib // 1024 - 2048)}M"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    started, up_before = time.time(), uptime()
    print(f"uptime: {up_before}", flush=True)
    runs = []
    for n in args.sizes:
        runs.append(bench_size(args, n))
        print_run(runs[-1])
        out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
               "uptime_before": up_before, "uptime_after": uptime(), "elapsed_s": round(time.time() - started, 1),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if k not in ("worker", "dir", "budget_bytes")}, "runs": runs}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
    print(f"\nuptime: {uptime()}\nelapsed {time.time() - started:.0f}s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
