"""Image decoding and preprocessing shared by training, indexing and serving.

One code path from bytes to a normalised tensor, so the service sees exactly what the
model saw in training. Plain PIL and torch: no torchvision.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError, ImageTooLargeError

if TYPE_CHECKING:
    from .config import CLIPConfig

ImageSource = str | Path | bytes | BinaryIO | Image.Image
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; raise for gigapixel scans on purpose
# The file endings every reader of image folders (training data, index builds, shards) accepts.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# We do our own pixel check before decoding, so PIL's own guard would only double-report.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


def open_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode any common image into an RGB PIL image, refusing pixel bombs before decoding.

    draft_size lets JPEG decode straight at a reduced scale (>= draft_size on the short
    side), which is several times faster for large photos headed for a 224 px crop.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                source = io.BytesIO(bytes(source))
            img = Image.open(source)
        except FileNotFoundError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"not a readable image: {exc}") from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("image has no pixels")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"image of {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:  # PIL's decoders raise many types (struct.error, KeyError, ...) on bad bytes
        raise ImageError(f"corrupt or truncated image: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (RGBA, LA, La, PA, P, L, CMYK, I;16, I, F) to 8-bit RGB; transparency composited over white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode == "La":  # premultiplied; PIL converts it only to LA
        img = img.convert("LA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        # I;16: a fixed 16-bit scale (a dark 16-bit photo must stay dark whatever its brightest pixel).
        # 32-bit "I" carries no bit depth (8-bit data converted to I, 16-bit TIFFs), so guess from the range.
        if img.mode.startswith("I;16") or (img.mode == "I" and hi > 255):
            arr = arr * (255.0 / 65535.0)
        elif hi > lo and img.mode == "F":
            # Float data has no natural scale: stretch its actual range to 0-255.
            arr = (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def _to_tensor(img: Image.Image, mean: torch.Tensor, std: torch.Tensor, exact_rescale: bool = False) -> torch.Tensor:
    """uint8 RGB -> normalised float32; exact_rescale multiplies by 1/255 in float64 as transformers does."""
    arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    x = arr.view(img.size[1], img.size[0], 3).permute(2, 0, 1)
    x = x.double().mul_(1 / 255).float() if exact_rescale else x.float().div_(255.0)
    return x.sub_(mean).div_(std)


def resize_shortest_edge(img: Image.Image, edge: int) -> Image.Image:
    """Bicubic resize of the short side to `edge`, the long side to int(edge * long / short), as transformers does."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(edge * long / short)
    return img.resize((edge, new_long) if w <= h else (new_long, edge), Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The size x size window at offset (dim - size) // 2 on each axis (transformers' centre crop)."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageTransform:
    """RGB PIL image -> normalised (3, size, size) tensor.

    Eval, resize "crop_box": the centred square resized to size in one bicubic step; "shortest_edge":
    transformers' CLIPImageProcessor, the short side to resize_size then a centre crop, so
    imported models see what they were trained on. Train: random resized crop (scale and
    aspect jitter), no horizontal flip by default since captions say left and right.
    """

    def __init__(
        self, size: int, mean: Sequence[float], std: Sequence[float], train: bool = False,
        scale: tuple[float, float] = (0.8, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = False,
        *, resize: str = "crop_box", resize_size: int | None = None,
    ) -> None:
        if resize not in ("crop_box", "shortest_edge"):
            raise ValueError(f"resize must be 'crop_box' or 'shortest_edge', got {resize!r}")
        self.size = size
        self.resize = resize
        self.resize_size = resize_size or size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.train = train
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip

    @classmethod
    def for_config(cls, cfg: CLIPConfig, train: bool = False, **kwargs: Any) -> ImageTransform:
        """The transform a model's config asks for (size, mean, std and its resize)."""
        return cls(cfg.img_size, cfg.image_mean, cfg.image_std, train, resize=cfg.image_resize,
                   resize_size=cfg.image_resize_size, **kwargs)

    @property
    def draft_size(self) -> int | None:
        """The JPEG draft size open_image may decode at; None where the resize must see every pixel."""
        return None if self.resize == "shortest_edge" else self.size

    def _center_box(self, w: int, h: int) -> tuple[float, float, float, float]:
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        return (left, top, left + side, top + side)

    def _random_box(self, w: int, h: int, rng: random.Random) -> tuple[float, float, float, float]:
        area = w * h
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw = math.sqrt(target * aspect)
            ch = math.sqrt(target / aspect)
            if 0 < cw <= w and 0 < ch <= h:
                left = rng.uniform(0, w - cw)
                top = rng.uniform(0, h - ch)
                return (left, top, left + cw, top + ch)
        return self._center_box(w, h)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = to_rgb(img)
        if self.resize == "shortest_edge" and not self.train:
            out = center_crop(resize_shortest_edge(img, self.resize_size), self.size)
            return _to_tensor(out, self.mean, self.std, exact_rescale=True)
        w, h = img.size
        box = self._random_box(w, h, rng or random) if self.train else self._center_box(w, h)
        # One resampling step: crop box and resize together, bicubic.
        out = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.train and self.hflip and (rng or random).random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(out, self.mean, self.std)


def load_and_preprocess(
    source: ImageSource, transform: ImageTransform, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Decode and preprocess in one call; the JPEG draft keeps the decode no larger than needed."""
    return transform(open_image(source, max_pixels=max_pixels, draft_size=transform.draft_size))
