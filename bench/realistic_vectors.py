"""Realistic index-benchmark vectors: clipforge embeddings of real images, and draws from a model fitted to them.

The embedding model is trained here for a few minutes on CIFAR-10 (bench/quality_bench.py's
CIFAR recipe with a 512-d projection), because no trained clipforge checkpoint is cached
and the random-weight ViT-B/32 copies under .cache/ have no neighbour structure worth
measuring. Real set: CIFAR-10 train images (each also horizontally flipped and
colour-jittered) and the Flickr8k-1k images. Queries: the CIFAR-10 test images (never
indexed) and text prompts. Sizes beyond the real set are drawn from a Gaussian mixture
fitted to the real embeddings (k-means clusters, each with its own principal axes and
variances, plus an isotropic residual), then normalised.

Everything is cached once as float16 under .cache/index_bench/; structure_stats() gives
the numbers that compare the real and the fitted set.

    .venv/bin/python bench/realistic_vectors.py --minutes 4      # train, embed, fit (once)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / ".cache" / "index_bench"
SHARED = ROOT.parent / "shared" / "data"
CLUSTERS = 256
AXES = 24  # principal axes kept per cluster; the rest of its variance is spread evenly


def train_model(minutes: float, threads: int) -> Path:
    """A CIFAR-10 clipforge checkpoint with 512-d embeddings (cached)."""
    ckpt = CACHE / "model" / "last"
    if (ckpt / "model.safetensors").is_file():
        return ckpt
    sys.path.insert(0, str(ROOT / "bench"))
    import quality_bench as qb

    qb.THREADS = threads
    root = qb.extract_cifar()
    values = qb._base(CACHE / "model", preset="mini-32", model={**qb.CIFAR_MODEL, "align_dim": 512},
                      data=f"imagefolder:{root / 'train'}", val_fraction=0.02, max_val_samples=1000,
                      batch_size=128, lr=2e-3, warmup_steps=100, weight_decay=0.1, hflip=True, plots=False,
                      tensorboard=False)
    run = qb.timed_train(values, minutes, 49000)
    (CACHE / "model.json").write_text(json.dumps(run, indent=2, default=str))
    return ckpt


def _augmented(path: Path, which: int):
    from PIL import Image, ImageEnhance, ImageOps

    img = Image.open(path).convert("RGB")
    if which == 1:
        img = ImageOps.mirror(img)
    elif which == 2:
        img = ImageEnhance.Color(ImageEnhance.Brightness(ImageOps.mirror(img)).enhance(1.2)).enhance(0.7)
    return img


def _embed(clip, images: list, batch: int = 256) -> np.ndarray:
    import torch

    out = []
    for start in range(0, len(images), batch):
        pixels = torch.stack([clip.preprocess(im) for im in images[start : start + batch]])
        out.append(clip.embed_pixels(pixels))
    return np.concatenate(out).astype(np.float32)


def embed_real(ckpt: Path, threads: int) -> dict[str, Path]:
    """Real base vectors (train images x 3 views + Flickr8k-1k), image queries (test images), text queries."""
    files = {name: CACHE / f"{name}.f16.npy" for name in ("real_base", "real_queries", "text_queries")}
    if all(f.is_file() for f in files.values()):
        return files
    import torch

    from model import CLIPInference

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "bench"))
    import quality_bench as qb

    root = qb.extract_cifar()
    clip = CLIPInference.load(ckpt)
    train = sorted((root / "train").rglob("*.jpg"))
    test = sorted((root / "test").rglob("*.jpg"))
    flickr = sorted((SHARED / "flickr8k-1k" / "images").glob("*.jpg"))
    t0 = time.perf_counter()
    parts = []
    for view in range(3):
        for start in range(0, len(train), 5000):
            parts.append(_embed(clip, [_augmented(p, view) for p in train[start : start + 5000]]))
        print(f"view {view}: {sum(len(p) for p in parts)} vectors, {time.perf_counter() - t0:.0f}s", flush=True)
    parts.append(_embed(clip, [_augmented(p, 0) for p in flickr]))
    base = np.concatenate(parts)
    queries = np.concatenate([_embed(clip, [_augmented(p, 0) for p in test[i : i + 5000]]) for i in range(0, len(test), 5000)])
    classes = sorted({p.parent.name for p in train})
    prompts = [t.format(c) for c in classes for t in ("a photo of a {}.", "a blurry photo of a {}.", "a {} in the picture.")]
    captions = (SHARED / "flickr8k-1k" / "captions.txt").read_text(encoding="utf-8").splitlines()[1:301]
    prompts += [line.split(",", 1)[1].strip().strip('"') for line in captions if "," in line]
    texts = clip.embed_texts(prompts)
    for name, arr in (("real_base", base), ("real_queries", queries), ("text_queries", texts)):
        arr = arr / np.linalg.norm(arr, axis=1, keepdims=True)
        np.save(files[name], arr.astype(np.float16))
    print(f"embedded {len(base)} base, {len(queries)} query images, {len(texts)} texts in {time.perf_counter() - t0:.0f}s")
    return files


class FittedMixture:
    """A Gaussian mixture over the real embeddings: cluster weights, means, principal axes and variances."""

    def __init__(self, real: np.ndarray, clusters: int = CLUSTERS, axes: int = AXES, seed: int = 0) -> None:
        import faiss

        x = np.ascontiguousarray(real, dtype=np.float32)
        km = faiss.Kmeans(x.shape[1], clusters, niter=20, seed=seed, spherical=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        assign = assign[:, 0]
        self.weights = np.bincount(assign, minlength=clusters) / len(x)
        self.means = km.centroids.astype(np.float32)
        d = x.shape[1]
        self.axes = np.zeros((clusters, axes, d), np.float32)
        self.scales = np.zeros((clusters, axes), np.float32)
        self.residual = np.zeros(clusters, np.float32)
        for c in range(clusters):
            members = x[assign == c] - self.means[c]
            if len(members) < 2:
                continue
            _, s, vt = np.linalg.svd(members, full_matrices=False)
            var = s**2 / (len(members) - 1)
            r = min(axes, len(var))
            self.axes[c, :r] = vt[:r]
            self.scales[c, :r] = np.sqrt(var[:r])
            self.residual[c] = np.sqrt(var[r:].sum() / max(d - r, 1))

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        """n unit vectors as float16."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.means.shape[1]), np.float16)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            c = rng.choice(len(self.weights), size=m, p=self.weights)
            z = rng.standard_normal((m, self.axes.shape[1]), dtype=np.float32) * self.scales[c]
            v = self.means[c] + np.einsum("na,nad->nd", z, self.axes[c])
            v += rng.standard_normal(v.shape, dtype=np.float32) * self.residual[c][:, None]
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            out[start : start + m] = v
        return out


def fitted_vectors(n: int, real: np.ndarray, seed: int = 7) -> np.ndarray:
    """n vectors drawn from the mixture fitted to `real`, cached as float16 (memory-mapped when read back)."""
    path = CACHE / f"fitted_{n}.f16.npy"
    if not path.is_file():
        mixture = FittedMixture(real)
        tmp = path.with_suffix(".tmp.npy")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, real.shape[1]))
        for start in range(0, n, 1_000_000):
            m = min(1_000_000, n - start)
            arr[start : start + m] = mixture.sample(m, seed=seed + start)
        arr.flush()
        del arr
        tmp.rename(path)
    return np.load(path, mmap_mode="r")


def structure_stats(x: np.ndarray, queries: np.ndarray, sample: int = 20_000, seed: int = 0) -> dict[str, float]:
    """Spectrum decay, relative contrast and local intrinsic dimension of `x` seen from `queries`.

    spectrum: share of the variance in the top 10 / 50 principal components. relative contrast:
    mean distance / nearest-neighbour distance (near 1 means no neighbour structure). LID:
    maximum-likelihood estimate from the 20 nearest neighbours.
    """
    import faiss

    rng = np.random.default_rng(seed)
    xs = np.asarray(x[np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))], dtype=np.float32)
    var = np.linalg.svd(xs - xs.mean(0), compute_uv=False) ** 2
    share = np.cumsum(var) / var.sum()
    flat = faiss.IndexFlatL2(x.shape[1])
    base = np.asarray(x, dtype=np.float32)
    flat.add(base)
    q = np.asarray(queries[:500], dtype=np.float32)
    d2, _ = flat.search(q, 21)
    dist = np.sqrt(np.maximum(d2, 1e-12))
    mean_dist = np.sqrt(np.maximum(2 - 2 * (q @ xs.T), 0)).mean(1)
    lid = -1.0 / np.mean(np.log(dist[:, :19] / dist[:, 19:20]), axis=1)
    return {"n": len(x), "var_top10": round(float(share[9]), 3), "var_top50": round(float(share[49]), 3),
            "relative_contrast": round(float(np.mean(mean_dist / dist[:, 0])), 3),
            "lid_mle20": round(float(np.median(lid)), 2), "nn1_cos": round(float(np.mean(1 - d2[:, 0] / 2)), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget of the embedding model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fitted", type=int, nargs="*", default=[], help="also draw these fitted sizes")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    files = embed_real(train_model(args.minutes, args.threads), args.threads)
    real = np.load(files["real_base"]).astype(np.float32)
    queries = np.load(files["real_queries"])
    stats = {"real": structure_stats(real, queries)}
    for n in args.fitted:
        fitted = fitted_vectors(n, real)
        stats[f"fitted_{n}"] = structure_stats(fitted[: len(real)], queries)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
