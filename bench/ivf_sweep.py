"""Which inverted-list index for 1M realistic vectors: code kinds x nprobe x re-rank factor, raw FAISS.

The sweep behind ivfpq's defaults (docs/benchmarks.md, "ivfpq at 1M"). Each variant is an IVF
index with an HNSW coarse quantizer wrapped in IndexRefine with float16 copies, the way
index/backends.py builds it, searched one query at a time on 1 thread; recall@10 against exact
search. Variants: pqMx8 (classic 8-bit PQ, inner product), fsM (4-bit fast scan, inner product),
fsl2M (4-bit fast scan, L2), sq8 (8-bit scalar codes).

    .venv/bin/python bench/ivf_sweep.py --base .cache/index_bench/fitted_1000000.f16.npy --nlist 4000 \
        --variants fsl2256 pq128x8 --nprobe 16 24 --refine 8 16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "index_bench"


def build(variant: str, xb: np.ndarray, nlist: int, train_size: int) -> tuple[faiss.Index, tuple, float, float]:
    """The index, the Python objects that own its parts (keep them alive), train and build seconds."""
    n, d = xb.shape
    l2 = variant.startswith("fsl2")
    metric = faiss.METRIC_L2 if l2 else faiss.METRIC_INNER_PRODUCT
    quantizer = faiss.IndexHNSWFlat(d, 32, metric)
    quantizer.hnsw.efConstruction = quantizer.hnsw.efSearch = 128
    if l2:
        base = faiss.IndexIVFPQFastScan(quantizer, d, nlist, int(variant[4:]), 4, metric)
    elif variant.startswith("fs"):
        base = faiss.IndexIVFPQFastScan(quantizer, d, nlist, int(variant[2:]), 4, metric)
    elif variant.startswith("pq") and variant.endswith("x8"):
        base = faiss.IndexIVFPQ(quantizer, d, nlist, int(variant[2:-2]), 8, metric)
    elif variant == "sq8":
        base = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, metric, True)
    else:
        raise SystemExit(f"unknown variant {variant}")
    base.cp.niter = 10
    t0 = time.perf_counter()
    sample = xb[np.random.default_rng(0).choice(n, min(n, train_size), replace=False)]
    base.train(sample)
    train_s = time.perf_counter() - t0
    refined = faiss.IndexRefine(base, faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, metric))
    index = faiss.IndexIDMap(refined)
    index.add_with_ids(xb, np.arange(n, dtype=np.int64))
    return index, (quantizer, base, refined), train_s, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(CACHE / "fitted_1000000.f16.npy"))
    parser.add_argument("--queries", default=str(CACHE / "real_queries.f16.npy"))
    parser.add_argument("--nq", type=int, default=300)
    parser.add_argument("--nlist", type=int, default=4000)
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--variants", nargs="+", default=["fsl2256", "pq128x8"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 24])
    parser.add_argument("--refine", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args()
    xb = np.load(args.base).astype(np.float32)
    xq = np.load(args.queries)[: args.nq].astype(np.float32)
    faiss.omp_set_num_threads(2)
    exact = faiss.IndexFlatIP(xb.shape[1])
    exact.add(xb)
    truth = exact.search(xq, 10)[1]
    del exact
    for variant in args.variants:
        faiss.omp_set_num_threads(2)
        index, _owners, train_s, build_s = build(variant, xb, args.nlist, args.train_size)
        print(f"{variant} nlist {args.nlist}: train {train_s:.1f} s, build {build_s:.1f} s (2 threads)", flush=True)
        faiss.omp_set_num_threads(1)
        for nprobe in args.nprobe:
            for factor in args.refine:
                ivf = faiss.SearchParametersIVF()
                ivf.nprobe = nprobe
                params = faiss.IndexRefineSearchParameters()
                params.k_factor = factor
                params.base_index_params = ivf
                times, found = [], []
                for q in xq:
                    t = time.perf_counter()
                    found.append(index.search(q[None, :], 10, params=params)[1][0])
                    times.append((time.perf_counter() - t) * 1e3)
                recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
                print(f"  nprobe {nprobe:3d} refine {factor:3d}: recall@10 {recall:.3f}  p50 {np.percentile(times, 50):.3f} ms"
                      f"  p99 {np.percentile(times, 99):.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
