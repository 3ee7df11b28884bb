"""Synthetic coloured shapes with captions, and a held-out set of colour-shape combinations.

Training images show 12 of the 18 colour x shape combinations (alone, with size, position
and background words, or in two-object scenes with a spatial relation); the other 6 never
appear in training in any form. Zero-shot accuracy on single-object images of those 6,
classified among all 18 "colour shape" names, measures whether the model composes colour
and shape rather than memorising pairs. Each colour is held out once and each shape twice,
so every held-out colour and shape is still seen in training with other partners.

Two things to watch when reading the held-out score: colour is learned long before shape,
and in training each colour rules one shape out (red is never a circle), so an early
model can score below chance on held-out shapes; and because each colour is held out
once, a model that simply prefers phrases it never trained on scores high on "heldout"
from colour alone. shapes_eval_set(dir, "seen") exposes that: report both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw

from .errors import DataError
from .records import Record

GENERATOR = "clipforge-shapes"
VERSION = 3
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "blue": (30, 70, 225), "green": (30, 165, 50),
    "yellow": (240, 215, 25), "purple": (135, 45, 185), "orange": (250, 135, 15),
}
SHAPES = ("circle", "square", "triangle")
CLASS_NAMES = [f"{c} {s}" for c in COLORS for s in SHAPES]
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "circle"), ("blue", "square"), ("green", "triangle"),
    ("yellow", "circle"), ("purple", "square"), ("orange", "triangle"),
)
TRAIN_COMBOS = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]
# Extra colours, crossed with every shape, appear in training only. Among the six main
# colours each colour rules one shape out, so colour alone predicts shape well enough
# that a small model learns colour and stops; objects whose colour says nothing about
# their shape make it learn shape itself, which is what the held-out test needs.
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {"pink": (240, 110, 190), "cyan": (40, 200, 215), "brown": (125, 75, 30)}
EXTRA_COMBOS = [(c, s) for c in EXTRA_COLORS for s in SHAPES]
PALETTE = {**COLORS, **EXTRA_COLORS}
TEMPLATES = ["a {}"]
# Neutral backgrounds that never look like one of the object colours.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "gray": (150, 150, 150), "black": (15, 15, 15),
}
POSITIONS = {  # name -> allowed range of the object centre, as a fraction of the image side (x, y)
    "in the center": ((0.4, 0.6), (0.4, 0.6)), "on the left": ((0.22, 0.32), (0.3, 0.7)),
    "on the right": ((0.68, 0.78), (0.3, 0.7)), "at the top": ((0.3, 0.7), (0.22, 0.32)),
    "at the bottom": ((0.3, 0.7), (0.68, 0.78)),
}
SIZES = {"small": (0.17, 0.21), "big": (0.27, 0.32)}  # half-extent as a fraction of the side: a small
# shape still spans ~12 px at 32 px, so circle, square and triangle stay tellable apart
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLITS = ("train", "val", "heldout", "seen")
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class ShapesParams:
    """Everything that determines the generated pixels; a folder is reused only when these match."""

    n_train: int
    n_val: int
    n_eval: int
    img_size: int
    seed: int
    pair_fraction: float
    noise_fraction: float
    extra_fraction: float
    image_format: str


def class_index(color: str, shape: str) -> int:
    """Index of "color shape" in CLASS_NAMES."""
    return CLASS_NAMES.index(f"{color} {shape}")


def held_out_names() -> list[str]:
    """The held-out "color shape" class names, never shown in training."""
    return [f"{c} {s}" for c, s in HELD_OUT]


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, *, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85  # a square of the same half-extent looks bigger than the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))


class _Painter:
    """Renders one scene at 2x and downsamples, which anti-aliases edges at 32 px."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.big = size * _SUPERSAMPLE

    def render(self, bg: tuple[int, int, int], objects: list[tuple[str, tuple[int, int, int], float, float, float]],
               noise: float, rng: np.random.Generator) -> Image.Image:
        img = Image.new("RGB", (self.big, self.big), bg)
        draw = ImageDraw.Draw(img)
        for shape, fill, fx, fy, fr in objects:
            _draw(draw, shape, cx=fx * self.big, cy=fy * self.big, r=fr * self.big, fill=fill)
        img = img.resize((self.size, self.size), Image.Resampling.BOX)
        if noise > 0:
            arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, (self.size, self.size, 3))
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        return img


def _single(rng: np.random.Generator, combos: list[tuple[str, str]], noisy: bool) -> tuple[dict, list, float, tuple]:
    color, shape = combos[rng.integers(len(combos))]
    size = ("small", "big")[rng.integers(2)]
    pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
    (x0, x1), (y0, y1) = POSITIONS[pos]
    r = rng.uniform(*SIZES[size])
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    # Keep the whole object inside the frame (a random crop may still trim a big one a little).
    lo, hi = r + 0.03, 1.0 - r - 0.03
    cx = rng.uniform(min(max(x0, lo), hi), max(min(x1, hi), lo))
    cy = rng.uniform(min(max(y0, lo), hi), max(min(y1, hi), lo))
    obj = (shape, _jitter(PALETTE[color], rng), cx, cy, r)
    captions = [
        f"a {color} {shape}", f"a {size} {color} {shape}", f"a {color} {shape} {pos}",
        f"a {size} {color} {shape} {pos} on a {bg_name} background",
    ]
    label = class_index(color, shape) if color in COLORS else None
    item = {"caption": captions, "label": label, "color": color, "shape": shape}
    return item, [obj], (6.0 if noisy else 0.0), _jitter(BACKGROUNDS[bg_name], rng, 8)


def _pair(rng: np.random.Generator, combos: list[tuple[str, str]], noisy: bool) -> tuple[dict, list, float, tuple]:
    i, j = rng.choice(len(combos), size=2, replace=False)
    (ca, sa), (cb, sb) = combos[i], combos[j]
    rel = list(RELATIONS)[rng.integers(len(RELATIONS))]
    r = rng.uniform(0.14, 0.17)
    along = (rng.uniform(0.2, 0.3), rng.uniform(0.7, 0.8))  # A's and B's coordinate on the relation axis
    across = rng.uniform(0.3, 0.7, 2)
    a_first = rel in ("left of", "above")
    pa, pb = (along if a_first else along[::-1])
    if rel in ("left of", "right of"):
        (ax, ay), (bx, by) = (pa, across[0]), (pb, across[1])
    else:
        (ax, ay), (bx, by) = (across[0], pa), (across[1], pb)
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    objs = [(sa, _jitter(PALETTE[ca], rng), ax, ay, r), (sb, _jitter(PALETTE[cb], rng), bx, by, r)]
    captions = [f"a {ca} {sa} {rel} a {cb} {sb}", f"a {cb} {sb} {RELATIONS[rel]} a {ca} {sa}"]
    return {"caption": captions, "label": None}, objs, (6.0 if noisy else 0.0), _jitter(BACKGROUNDS[bg_name], rng, 8)


def _write_split(root: Path, split: str, n: int, *, params: ShapesParams) -> list[dict[str, Any]]:
    rng = np.random.default_rng(np.random.SeedSequence([params.seed, SPLITS.index(split)]))
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    painter = _Painter(params.img_size)
    ext = "png" if params.image_format == "png" else "jpg"
    items = []
    for k in range(n):
        if split in ("train", "val"):
            noisy = bool(rng.random() < params.noise_fraction)
            if rng.random() < params.pair_fraction:
                item, objs, noise, bg = _pair(rng, TRAIN_COMBOS + EXTRA_COMBOS, noisy)
            else:
                combos = EXTRA_COMBOS if rng.random() < params.extra_fraction else TRAIN_COMBOS
                item, objs, noise, bg = _single(rng, combos, noisy)
        else:
            # Evaluation sets: clean single objects, balanced over their combinations.
            combos = list(HELD_OUT) if split == "heldout" else TRAIN_COMBOS
            item, objs, noise, bg = _single(rng, [combos[k % len(combos)]], False)
        img = painter.render(bg, objs, noise, rng)
        name = f"images/{split}/{k:06d}.{ext}"
        if ext == "png":
            img.save(root / name, format="PNG", compress_level=1)
        else:
            img.save(root / name, format="JPEG", quality=95)
        item["image"] = name
        items.append(item)
    (root / f"{split}.json").write_text(json.dumps(items), encoding="utf-8")
    return items


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete generated folder, or None when there is none."""
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def generate_shapes(
    out_dir: str | Path, n_train: int, n_val: int, img_size: int = 64, seed: int = 0, n_eval: int = 600,
    pair_fraction: float = 0.3, noise_fraction: float = 0.2, extra_fraction: float = 0.35, image_format: str = "png",
) -> Path:
    """Write the data set (images, train/val/heldout/seen JSON lists, manifest) and return its folder.

    Idempotent: a complete folder generated with the same parameters is reused as is. The
    folder is built beside the target and renamed into place, so an interrupted run never
    leaves a half-written data set that looks complete.
    """
    if n_train < 1 or n_val < 0 or n_eval < 0:
        raise DataError("shapes needs n_train >= 1, n_val >= 0 and n_eval >= 0")
    if not 16 <= img_size <= 1024:
        raise DataError(f"shapes img_size must be between 16 and 1024, got {img_size}")
    if not all(0.0 <= f <= 1.0 for f in (pair_fraction, noise_fraction, extra_fraction)):
        raise DataError("pair_fraction, noise_fraction and extra_fraction must be between 0 and 1")
    if image_format not in ("png", "jpeg"):
        raise DataError(f"shapes image_format must be 'png' or 'jpeg', got {image_format!r}")
    params = ShapesParams(
        n_train=n_train, n_val=n_val, n_eval=n_eval, img_size=img_size, seed=seed, pair_fraction=pair_fraction,
        noise_fraction=noise_fraction, extra_fraction=extra_fraction, image_format=image_format,
    )
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        existing = read_manifest(out)
        if existing is not None:
            if existing.get("version") != VERSION:
                raise DataError(
                    f"{out} holds shapes made by generator version {existing.get('version')} (now {VERSION}); "
                    "delete it or use another folder"
                )
            if existing.get("params") == asdict(params):
                return out
            raise DataError(
                f"{out} already holds a shapes data set made with other parameters ({existing.get('params')}); "
                "use another folder or delete this one"
            )
        if out.exists() and any(out.iterdir()):
            raise DataError(f"{out} exists and is not a shapes data set; refusing to write into it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            counts = {split: n for split, n in zip(SPLITS, (n_train, n_val, n_eval, n_eval), strict=True)}
            for split, n in counts.items():
                _write_split(tmp, split, n, params=params)
            manifest = {
                "generator": GENERATOR, "version": VERSION, "params": asdict(params), "colors": list(COLORS),
                "shapes": list(SHAPES), "class_names": CLASS_NAMES, "held_out": held_out_names(),
                "train_combos": [f"{c} {s}" for c, s in TRAIN_COMBOS], "extra_colors": list(EXTRA_COLORS),
                "templates": TEMPLATES, "splits": counts,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def load_shapes_split(out_dir: str | Path, split: str = "train", max_samples: int | None = None) -> list[Record]:
    """Records of one split of a generated folder; labels index CLASS_NAMES (None for two-object scenes)."""
    root = Path(out_dir).expanduser().resolve()
    if read_manifest(root) is None:
        raise DataError(f"{root} is not a generated shapes data set (no manifest.json); generate it first")
    if split not in SPLITS:
        raise DataError(f"shapes split must be one of {SPLITS}, got {split!r}")
    items = json.loads((root / f"{split}.json").read_text(encoding="utf-8"))
    if max_samples is not None:
        items = items[:max_samples]
    return [
        Record(key=it["image"], image=str(root / it["image"]), captions=tuple(it["caption"]), label=it["label"])
        for it in items
    ]


def shapes_eval_set(out_dir: str | Path, which: str = "heldout") -> tuple[list[Record], list[str]]:
    """Single-object evaluation records and the 18 class names to classify them among.

    which: "heldout" (the 6 combinations never trained on), "seen" (the 12 trained ones) or
    "all" (both). Report seen next to heldout: each colour is held out exactly once, so a
    model that merely prefers phrases it never trained on scores well on "heldout" from
    colour alone while its "seen" accuracy collapses; only both high shows composition.
    """
    if which == "all":
        return load_shapes_split(out_dir, "heldout") + load_shapes_split(out_dir, "seen"), list(CLASS_NAMES)
    if which not in ("heldout", "seen"):
        raise DataError(f"shapes evaluation set must be 'heldout', 'seen' or 'all', got {which!r}")
    return load_shapes_split(out_dir, which), list(CLASS_NAMES)


DEFAULTS = {"n_train": 10000, "n_val": 500, "img_size": 64, "seed": 0}


def ensure_shapes(spec: Any) -> Path:
    """Generate the folder a shapes DataSpec names when it is absent; reuse it when present.

    Parameters left unset in the spec take DEFAULTS when generating and are not checked
    against an existing folder, so "shapes:DIR" reuses whatever DIR holds.
    """
    out = Path(spec.path).expanduser()
    given = {k: getattr(spec, k) for k in DEFAULTS if getattr(spec, k) is not None}
    manifest = read_manifest(out)
    if manifest is not None:
        differing = {k: v for k, v in given.items() if manifest["params"].get(k) != v}
        if not differing and manifest.get("version") == VERSION:
            return out.resolve()
    return generate_shapes(out, **{**DEFAULTS, **given})
