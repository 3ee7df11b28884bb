"""The peer benchmark's index builds: `clipforge index build` against `clip-retrieval inference`.

Both are timed end to end over the same image folder, model load included, as a user runs them,
with the same batch size, decoding workers and thread count. clip-retrieval's embeddings are then
checked against clipforge's for the same files, so the two really ran the same weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from peer_servers import clipforge_name, last_error_line, thread_env, venv_python
from peer_weights import ROOT, rows_cosine


def timed(cmd: list[str], *, cwd: Path, env: dict, log: Path, timeout: float) -> float:
    started = time.perf_counter()
    with log.open("wb") as out:
        done = subprocess.run(cmd, check=False, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} {cmd[1]} failed (rc {done.returncode}): {last_error_line(log)}")
    return time.perf_counter() - started


def _row(tool: str, n: int, wall: float) -> dict:
    print(f"{tool}: {n} images in {wall:.1f}s, {n / wall:.2f} images/s", flush=True)
    return {"tool": tool, "images": n, "seconds": round(wall, 1), "images_per_s": round(n / wall, 2)}


BUILD_TOOLS = {"clipforge": "clipforge index build", "clipforge-bf16": "clipforge index build --precision bf16"}


def clipforge_index_dir(work: Path, precision: str = "fp32") -> Path:
    """Where `build_clipforge` writes the index of that precision (and the server of that precision reads it)."""
    return work / ("clipforge-index" if precision == "fp32" else f"clipforge-index-{precision}")


def build_clipforge(ckpt: Path, images: Path, work: Path, args: argparse.Namespace, *,
                    precision: str = "fp32") -> tuple[Path, dict]:
    n, out = len(list(images.glob("*.jpg"))), clipforge_index_dir(work, precision)
    wall = timed([sys.executable, "-m", "clipforge_cli", "index", "build", "--checkpoint", str(ckpt), "--images",
                  str(images), "--out", str(out), "--batch-size", str(args.build_batch_size), "--workers",
                  str(args.workers), "--precision", precision, "--quiet"], cwd=ROOT, env=thread_env(args.threads),
                 log=work / f"clipforge-build-{precision}.log", timeout=args.build_timeout)
    return out, _row(BUILD_TOOLS[clipforge_name(precision)], n, wall)


def build_clip_retrieval(hf: Path, images: Path, work: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """`clip-retrieval inference` (timed, the compared figure), then `clip-retrieval index` (timed apart)."""
    bin_dir = venv_python("clip-retrieval").parent
    n, emb, index, env = len(list(images.glob("*.jpg"))), work / "cr-embeddings", work / "cr-index", thread_env(args.threads)
    wall = timed([str(bin_dir / "clip-retrieval"), "inference", "--input_dataset", str(images), "--output_folder",
                  str(emb), "--input_format", "files", "--clip_model", f"hf_clip:{hf}", "--enable_text", "False",
                  "--batch_size", str(args.build_batch_size), "--num_prepro_workers", str(args.workers),
                  "--enable_wandb", "False", "--use_jit", "False"],
                 cwd=work, env=env, log=work / "cr-inference.log", timeout=args.build_timeout)
    row = _row("clip-retrieval inference", n, wall)
    wall_index = timed([str(bin_dir / "clip-retrieval"), "index", "--embeddings_folder", str(emb), "--index_folder",
                        str(index)], cwd=work, env=env, log=work / "cr-index.log", timeout=args.build_timeout)
    row["index_seconds"] = round(wall_index, 1)
    row["inference_plus_index_images_per_s"] = round(n / (wall + wall_index), 2)
    print(f"clip-retrieval index: {wall_index:.1f}s", flush=True)
    return index, row


def clip_retrieval_paths(work: Path) -> list[str]:
    """Image paths in clip-retrieval's id order (its embeddings' metadata), read by its own pandas."""
    code = ("import json, sys, pandas; "
            "print(json.dumps(pandas.read_parquet(sys.argv[1])['image_path'].tolist()))")
    out = subprocess.run([str(venv_python("clip-retrieval")), "-c", code,
                          str(work / "cr-embeddings" / "metadata" / "metadata_0.parquet")],
                         check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout)


def clip_retrieval_agreement(ckpt: Path, work: Path, *, count: int = 8) -> dict[str, float]:
    """Cosine between clip-retrieval's stored embedding of a file and clipforge's of the same file,
    beside the highest cosine between different files (what a mix-up would show)."""
    from model import CLIPInference

    paths = clip_retrieval_paths(work)
    stored = np.load(work / "cr-embeddings" / "img_emb" / "img_emb_0.npy")[:count]
    ours = CLIPInference.load(ckpt).embed_images([Path(p) for p in paths[:count]])
    same = rows_cosine(stored, ours)
    shifted = rows_cosine(stored, np.roll(ours, 1, axis=0))
    return {"image_min_cosine": round(min(same), 6), "different_images_max_cosine": round(max(shifted), 6),
            "images": len(same)}
