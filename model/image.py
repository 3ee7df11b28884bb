"""Image decoding and preprocessing shared by training, indexing and serving.

One code path from bytes to a normalised tensor, so the service sees exactly what the
model saw in training. Plain PIL and torch: no torchvision.
"""

from __future__ import annotations

import functools
import io
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageMode, ImageOps, UnidentifiedImageError

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


def open_image(
    source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None, *,
    max_decode_bytes: int | None = None,
) -> Image.Image:
    """Decode any common image into an RGB PIL image, refusing pixel bombs before decoding.

    draft_size lets JPEG decode straight at a reduced scale (>= draft_size on the short
    side), which is several times faster for large photos headed for a 224 px crop.
    max_decode_bytes refuses an image whose decoded pixels (header_of: width x height x
    bands x bytes per band) would take more bytes, before any of them is allocated.
    """
    img = source if isinstance(source, Image.Image) else _open_lazily(source)
    refuse_oversized(header_of(img, draft_size), max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            if isinstance(source, Image.Image):  # the caller's image is left as it was
                img = ImageOps.exif_transpose(img)
            else:  # ours: rotated in place (exif_transpose would otherwise copy every image)
                ImageOps.exif_transpose(img, in_place=True)
            return to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:  # PIL's decoders raise many types (struct.error, KeyError, ...) on bad bytes
        raise ImageError(f"corrupt or truncated image: {exc}") from exc


def _open_lazily(source: str | Path | bytes | BinaryIO) -> Image.Image:
    """Image.open (the header only; pixels are decoded by load()), with unreadable input as ImageError."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        return Image.open(source)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"not a readable image: {exc}") from exc


# Row bands of at most this many pixels: the mode conversions below never hold a full-size temporary.
CONVERT_CHUNK_PIXELS = 1 << 20
# PIL stores 2-, 3- and 4-band 8-bit modes (LA, RGB, RGBA, CMYK, ...) in 4 bytes a pixel.
_RGB_BYTES_PER_PIXEL = 4
# What converting one band holds beside the image (float64 copies of it while scaling).
_BAND_WORKING_BYTES = 3 * 8 * CONVERT_CHUNK_PIXELS


@dataclass(frozen=True)
class ImageHeader:
    """What decoding an image will cost, known from its header before any pixel is decoded."""

    width: int  # as the header says
    height: int
    mode: str
    decoded_bytes: int  # pixels x bands x bytes per band of the mode, as decoded (a JPEG draft decodes smaller)
    peak_bytes: int  # an upper estimate of what open_image holds at once for it (decoded, converted, RGB)


def refuse_oversized(header: ImageHeader, *, max_pixels: int, max_decode_bytes: int | None = None) -> None:
    """ImageTooLargeError for a pixel bomb, or (with max_decode_bytes) an image that decodes to more bytes."""
    w, h = header.width, header.height
    if w <= 0 or h <= 0:
        raise ImageError("image has no pixels")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"image of {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")
    if max_decode_bytes is not None and header.decoded_bytes > max_decode_bytes:
        raise ImageTooLargeError(f"image of {w}x{h} in mode {header.mode} decodes to {header.decoded_bytes:,} "
                                 f"bytes; the limit is {max_decode_bytes:,}")


def header_of(img: Image.Image, draft_size: int | None = None) -> ImageHeader:
    """The decode cost of an opened (not yet loaded) image; draft_size as open_image would apply it."""
    full = w, h = img.size
    if draft_size and img.format == "JPEG" and len(getattr(img, "tile", ())) == 1:
        # JpegImageFile.draft: the largest of 8, 4, 2, 1 that keeps both sides >= the requested size
        reduce = min(w // draft_size, h // draft_size)
        scale = next((s for s in (8, 4, 2, 1) if reduce >= s), 1)  # smaller than draft_size: no reduction
        w, h = (w + scale - 1) // scale, (h + scale - 1) // scale
    try:
        descriptor = ImageMode.getmode(img.mode)
        bands, per_band = len(descriptor.bands), int(descriptor.typestr[-1])
    except (KeyError, ValueError):  # a mode PIL cannot describe: assume the widest (4 bands of 4 bytes)
        bands, per_band = 4, 4
    pixels = w * h
    stored = pixels * (per_band if bands == 1 else max(_RGB_BYTES_PER_PIXEL, bands * per_band))
    # then either an EXIF rotation (a second copy, briefly) or the RGB result beside it, and one row band
    rgb = 0 if img.mode == "RGB" else _RGB_BYTES_PER_PIXEL * pixels
    peak = stored + max(stored, rgb) + _BAND_WORKING_BYTES
    return ImageHeader(*full, img.mode, pixels * bands * per_band, peak)


def read_header(source: ImageSource, draft_size: int | None = None) -> ImageHeader:
    """header_of for bytes, a path or a file: reads the header only, so a pixel bomb costs nothing here."""
    if isinstance(source, Image.Image):
        return header_of(source, draft_size)
    with _open_lazily(source) as img:
        return header_of(img, draft_size)


def _row_bands(img: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    """(top, band) for horizontal bands of img, each at most CONVERT_CHUNK_PIXELS pixels."""
    w, h = img.size
    rows = max(1, CONVERT_CHUNK_PIXELS // max(w, 1))
    for top in range(0, h, rows):
        yield top, img.crop((0, top, w, min(h, top + rows)))


def _banded_rgb(img: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """An RGB image built band by band: `convert` sees one row band at a time (pixel-wise conversions only)."""
    out = Image.new("RGB", img.size)
    for top, band in _row_bands(img):
        out.paste(convert(band), (0, top))
    return out


def _over_white(band: Image.Image) -> Image.Image:
    # La is premultiplied, and PIL converts it only to LA
    rgba = band.convert("LA").convert("RGBA") if band.mode == "La" else band.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _deep_to_l(img: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """The band converter of a 16-bit, 32-bit integer or float image to 8-bit L.

    Every band is scaled exactly as the whole image was before (float64 arithmetic per pixel),
    so the output is the same; only the full-size float64 copies are gone.
    """
    if img.mode.startswith("I;16"):
        # a fixed 16-bit scale (a dark 16-bit photo must stay dark whatever its brightest pixel): one lookup table
        lut = _i16_lut()
        return lambda band: Image.fromarray(lut[np.asarray(band)])
    lo = hi = None
    for _, band in _row_bands(img):  # the range of the whole image, as np.min/max over it gave (NaN included)
        arr = np.asarray(band, dtype=np.float64)
        band_lo, band_hi = arr.min(), arr.max()
        lo = band_lo if lo is None else np.minimum(lo, band_lo)
        hi = band_hi if hi is None else np.maximum(hi, band_hi)
    lo, hi = float(lo), float(hi)
    mode = img.mode

    def convert(band: Image.Image) -> Image.Image:
        arr = np.asarray(band, dtype=np.float64)
        # 32-bit "I" carries no bit depth (8-bit data converted to I, 16-bit TIFFs), so guess from the range.
        if mode == "I" and hi > 255:
            arr = arr * (255.0 / 65535.0)
        elif hi > lo and mode == "F":
            # Float data has no natural scale: stretch its actual range to 0-255.
            arr = (arr - lo) / (hi - lo) * 255.0
        with np.errstate(invalid="ignore"):
            return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    return convert


@functools.cache
def _i16_lut() -> np.ndarray:
    # The float64 scale the conversion always used, evaluated once for every 16-bit value (it equals v // 257).
    return np.clip(np.arange(65536, dtype=np.float64) * (255.0 / 65535.0), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (RGBA, LA, La, PA, P, L, CMYK, I;16, I, F) to 8-bit RGB; transparency composited over white.

    Conversions that need working copies (alpha compositing, 16-bit and float scaling) run in
    row bands, so converting costs the RGB result plus one band, whatever the image's size.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if img.mode in ("RGBA", "LA", "La", "PA", "RGBa", "P"):
        return _banded_rgb(img, _over_white)
    if img.mode.startswith("I") or img.mode == "F":
        return _banded_rgb(img, _deep_to_l(img))
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


def crop_offset(margin: int, rule: str = "floor") -> int:
    """Where a centre crop starts on an axis with `margin` spare pixels.

    "floor": margin // 2 (transformers' CLIPImageProcessor). "round": int(round(margin / 2)),
    Python's half-to-even rounding as torchvision's CenterCrop (open_clip's eval transform) does,
    so 15.5 gives 16 and 14.5 gives 14.
    """
    if rule == "floor":
        return margin // 2
    if rule == "round":
        return round(margin / 2)
    raise ValueError(f"crop offset rule must be 'floor' or 'round', got {rule!r}")


def center_crop(img: Image.Image, size: int, *, offset: str = "floor") -> Image.Image:
    """The size x size window at crop_offset(dim - size, offset) on each axis (transformers' centre crop by default)."""
    w, h = img.size
    left, top = crop_offset(w - size, offset), crop_offset(h - size, offset)
    return img.crop((left, top, left + size, top + size))


class ImageTransform:
    """RGB PIL image -> normalised (3, size, size) tensor.

    Eval, resize "crop_box": the centred square resized to size in one bicubic step; "shortest_edge":
    transformers' CLIPImageProcessor, the short side to resize_size then a centre crop (its offset
    floored, or rounded as open_clip's torchvision transform does: crop_offset), so imported
    models see what they were trained on. Train: random resized crop (scale and
    aspect jitter), no horizontal flip by default since captions say left and right.
    """

    def __init__(
        self, size: int, mean: Sequence[float], std: Sequence[float], train: bool = False,
        scale: tuple[float, float] = (0.8, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = False,
        *, resize: str = "crop_box", resize_size: int | None = None, crop_offset: str = "floor",
    ) -> None:
        if resize not in ("crop_box", "shortest_edge"):
            raise ValueError(f"resize must be 'crop_box' or 'shortest_edge', got {resize!r}")
        if crop_offset not in ("floor", "round"):
            raise ValueError(f"crop_offset must be 'floor' or 'round', got {crop_offset!r}")
        self.size = size
        self.resize = resize
        self.crop_offset = crop_offset
        self.resize_size = resize_size or size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.train = train
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip

    @classmethod
    def for_config(cls, cfg: CLIPConfig, train: bool = False, **kwargs: Any) -> ImageTransform:
        """The transform a model's config asks for (size, mean, std, its resize and crop offset)."""
        return cls(cfg.img_size, cfg.image_mean, cfg.image_std, train, resize=cfg.image_resize,
                   resize_size=cfg.image_resize_size, crop_offset=cfg.image_crop_offset, **kwargs)

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
            out = center_crop(resize_shortest_edge(img, self.resize_size), self.size, offset=self.crop_offset)
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
