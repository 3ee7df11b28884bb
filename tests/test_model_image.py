"""Image decoding and preprocessing: every mode, EXIF orientation, pixel bombs, broken files."""

from __future__ import annotations

import io
import random
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageTooLargeError,
    ImageTransform,
    load_and_preprocess,
    open_image,
)
from model.config import CLIP_MEAN, CLIP_STD
from model.image import read_header, to_rgb


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height pixels in a few dozen bytes (no image data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + data + chunk(b"IEND", b"")


def _rgb_at(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    out = to_rgb(img)
    assert out.mode == "RGB"
    return out.getpixel(xy)


# --------------------------------------------------------------------------- modes
def test_rgba_transparent_pixels_become_white_and_opaque_keep_colour() -> None:
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    img.putpixel((1, 0), (10, 20, 30, 255))
    assert _rgb_at(img, (0, 0)) == (255, 255, 255)
    assert _rgb_at(img, (1, 0)) == (10, 20, 30)
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert all(abs(c - 127) <= 1 for c in _rgb_at(half))


def test_la_and_l_and_1_modes() -> None:
    assert _rgb_at(Image.new("LA", (1, 1), (40, 0))) == (255, 255, 255)
    assert _rgb_at(Image.new("LA", (1, 1), (40, 255))) == (40, 40, 40)
    assert _rgb_at(Image.new("L", (1, 1), 128)) == (128, 128, 128)
    assert _rgb_at(Image.new("1", (1, 1), 1)) == (255, 255, 255)
    assert _rgb_at(Image.new("1", (1, 1), 0)) == (0, 0, 0)


def test_palette_with_and_without_transparency() -> None:
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([200, 10, 10, 0, 0, 250] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert _rgb_at(pal, (0, 0)) == (200, 10, 10)
    assert _rgb_at(pal, (1, 0)) == (0, 0, 250)
    # Index 0 transparent, as a GIF or PNG stores it, after a real encode/decode.
    decoded = Image.open(io.BytesIO(_encode(pal, "PNG", transparency=0)))
    assert decoded.mode == "P" and "transparency" in decoded.info
    assert _rgb_at(decoded, (0, 0)) == (255, 255, 255)
    assert _rgb_at(decoded, (1, 0)) == (0, 0, 250)


def test_cmyk() -> None:
    assert _rgb_at(Image.new("CMYK", (1, 1), (0, 255, 255, 0))) == (255, 0, 0)
    assert _rgb_at(Image.new("CMYK", (1, 1), (0, 0, 0, 255))) == (0, 0, 0)
    decoded = open_image(_encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))
    assert decoded.mode == "RGB" and all(c > 240 for c in decoded.getpixel((4, 4)))


def test_16_bit_and_32_bit_and_float_modes() -> None:
    img16 = Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.uint16))
    assert img16.mode.startswith("I;16")
    rgb = to_rgb(img16)
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (255, 255, 255), (127, 127, 127)]
    # 16-bit PNG through the decoder.
    decoded = open_image(_encode(img16, "PNG"))
    assert decoded.mode == "RGB" and decoded.getpixel((1, 0)) == (255, 255, 255)
    img32 = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), mode="I")
    assert [to_rgb(img32).getpixel((x, 0))[0] for x in range(3)] == [0, 3, 255]
    small_i = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I")
    assert [to_rgb(small_i).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    f = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32), mode="F")
    assert [to_rgb(f).getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]


def test_dark_16_bit_png_stays_dark_whatever_its_brightest_pixel(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 201, size=(16, 16), dtype=np.uint16)  # 0..200 of 65535: nearly black
    path = tmp_path / "dark16.png"
    Image.fromarray(dark).save(path)
    brighter = dark.copy()
    brighter[0, 0] = 256
    means = []
    for arr in (dark, brighter):
        decoded = open_image(_encode(Image.fromarray(arr), "PNG"))
        pixels = np.asarray(decoded, dtype=np.float64)
        assert pixels.mean() < 5, "a dark 16-bit image must not come out bright"
        means.append(pixels.mean())
    assert abs(means[0] - means[1]) < 0.1  # one pixel at 256 must not change the scale
    assert np.asarray(open_image(path)).max() <= 1  # 200 / 65535 of full scale


def test_premultiplied_alpha_modes() -> None:
    la = Image.new("LA", (1, 1), (40, 255)).convert("La")
    assert la.mode == "La" and _rgb_at(la) == (40, 40, 40)
    assert _rgb_at(Image.new("LA", (1, 1), (40, 0)).convert("La")) == (255, 255, 255)
    pa = Image.new("PA", (2, 1), (0, 255))
    pa.putpalette([200, 10, 10] + [0] * 765)
    pa.putpixel((1, 0), (0, 0))
    assert _rgb_at(pa, (0, 0)) == (200, 10, 10) and _rgb_at(pa, (1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "La", "PA", "P", "L", "CMYK", "I;16", "I", "F", "1", "RGB", "YCbCr"])
def test_every_mode_preprocesses_to_a_normalised_tensor(mode: str) -> None:
    img = Image.new("RGB", (40, 30), (90, 160, 220)).convert(mode, dither=Image.Dither.NONE)
    x = ImageTransform(16, CLIP_MEAN, CLIP_STD)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # Undo the normalisation: a uniform image stays uniform and in [0, 1].
    raw = x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert torch.allclose(raw, raw[:, :1, :1].expand_as(raw), atol=1e-5)


def test_normalisation_uses_mean_and_std() -> None:
    img = Image.new("RGB", (8, 8), (255, 0, 51))
    x = ImageTransform(4, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))(img)
    assert torch.allclose(x[:, 0, 0], torch.tensor([2.0, -1.0, -0.3]), atol=1e-6)


# --------------------------------------------------------------------------- geometry
def _halves(size: tuple[int, int], left: tuple, right: tuple) -> Image.Image:
    img = Image.new("RGB", size, left)
    img.paste(Image.new("RGB", (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def test_exif_orientation_is_applied() -> None:
    img = _halves((40, 20), (255, 0, 0), (0, 0, 255))  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = open_image(_encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert decoded.size == (20, 40)
    top, bottom = decoded.getpixel((10, 5)), decoded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # red now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_eval_transform_resizes_short_side_and_centre_crops() -> None:
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste(Image.new("RGB", (100, 100), (255, 255, 255)), (100, 0))  # white centre square
    x = ImageTransform(32, (0, 0, 0), (1, 1, 1))(img)
    assert x.shape == (3, 32, 32)
    # Only the white centre survives the crop (bicubic support blends the outermost columns a little).
    assert x[:, :, 1:-1].min() > 0.99 and x.min() > 0.85


def test_train_transform_is_seeded_random_crop_without_flip() -> None:
    img = _halves((64, 64), (255, 0, 0), (0, 0, 255))
    tf = ImageTransform(16, (0, 0, 0), (1, 1, 1), train=True)
    a = tf(img, random.Random(1))
    assert torch.equal(a, tf(img, random.Random(1)))
    crops = [tf(img, random.Random(seed)) for seed in range(20)]
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    for c in crops:  # never flipped: red stays on the left, blue on the right
        assert c[0, :, 0].mean() > 0.9 and c[2, :, -1].mean() > 0.9
    flipping = ImageTransform(16, (0, 0, 0), (1, 1, 1), train=True, hflip=True)
    flips = [flipping(img, random.Random(seed)) for seed in range(20)]
    assert any(c[2, :, 0].mean() > 0.9 for c in flips)


def test_large_jpeg_uses_draft_decoding_and_gives_the_same_size() -> None:
    data = _encode(Image.new("RGB", (2000, 1500), (30, 200, 60)), "JPEG", quality=90)
    img = open_image(data, draft_size=64)
    assert min(img.size) >= 64 and img.size[0] <= 500
    x = load_and_preprocess(data, ImageTransform(64, CLIP_MEAN, CLIP_STD))
    assert x.shape == (3, 64, 64)


def test_jpeg_smaller_than_the_draft_size_is_priced_at_full_size() -> None:
    data = _encode(Image.new("RGB", (1, 1), (30, 200, 60)), "JPEG")  # what schemathesis sent: a 1x1 JPEG
    header = read_header(data, draft_size=224)
    assert (header.width, header.height, header.decoded_bytes) == (1, 1, 3)
    assert load_and_preprocess(data, ImageTransform(32, CLIP_MEAN, CLIP_STD)).shape == (3, 32, 32)


# --------------------------------------------------------------------------- bad input
def test_pixel_bomb_is_refused_before_decoding() -> None:
    bomb = _png_header(50_000, 50_000)
    assert len(bomb) < 200
    start = time.process_time()  # CPU time: steady on a loaded machine
    with pytest.raises(ImageTooLargeError, match="50000x50000 = 2,500,000,000 pixels exceeds the limit"):
        open_image(bomb)
    with pytest.raises(ImageTooLargeError):
        load_and_preprocess(io.BytesIO(bomb), ImageTransform(32, CLIP_MEAN, CLIP_STD))
    assert time.process_time() - start < 0.5  # decoding 2.5 G pixels would take minutes and 7.5 GB
    assert issubclass(ImageTooLargeError, ImageError)


def test_pixel_limit_is_configurable() -> None:
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    assert open_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageTooLargeError):
        open_image(data, max_pixels=9_999)
    with pytest.raises(ImageTooLargeError):
        open_image(Image.new("RGB", (100, 100)), max_pixels=100)
    assert DEFAULT_MAX_PIXELS >= 4000 * 4000


def test_truncated_jpeg_raises_image_error() -> None:
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is a text file\n" * 10, b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"GIF89a" + b"\xff" * 10],
    ids=["empty", "text", "png-garbage", "gif-garbage"],
)
def test_non_images_raise_image_error(data: bytes) -> None:
    with pytest.raises(ImageError):
        open_image(data)


def test_paths_work_and_missing_paths_raise_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    Image.new("RGB", (10, 12), (1, 2, 3)).save(path)
    assert open_image(path).getpixel((0, 0)) == (1, 2, 3)
    assert open_image(str(path)).size == (10, 12)
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "nope.png")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(text)


# --------------------------------------------------------------------------- transformers' CLIPImageProcessor
def _photos(shared_data: Path) -> list[Path]:
    """Real photos of different sizes and aspects (landscape, portrait, 200 and 500 px)."""
    by_size: dict[tuple[int, int], Path] = {}
    for path in sorted((shared_data / "flickr8k-1k" / "images").glob("*.jpg")):
        with Image.open(path) as im:
            by_size.setdefault(im.size, path)
        if len(by_size) >= 8:
            break
    return list(by_size.values())


@pytest.mark.parametrize(("edge", "crop"), [(224, 224), (72, 64), (64, 64)])
def test_shortest_edge_resize_equals_transformers_clip_image_processor(shared_data: Path, edge: int,
                                                                       crop: int) -> None:
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": edge}, crop_size={"height": crop, "width": crop})
    ours = ImageTransform(crop, CLIP_MEAN, CLIP_STD, resize="shortest_edge", resize_size=edge)
    photos = _photos(shared_data)
    sizes = {Image.open(p).size for p in photos}
    assert len(sizes) >= 4 and any(w < h for w, h in sizes) and any(w > h for w, h in sizes)
    big = Image.open(photos[0]).convert("RGB").resize((1601, 900))  # a large JPEG: no draft decoding may apply
    big_jpeg = _encode(big, "JPEG", quality=90)
    for source in [*photos, big_jpeg]:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).convert("RGB")
        expected = torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"][0])
        got = load_and_preprocess(source, ours)
        assert got.shape == (3, crop, crop)
        assert torch.allclose(got, expected, atol=1e-6), (source if isinstance(source, Path) else "big jpeg")


def test_transform_for_config_follows_the_config() -> None:
    from model import CLIPConfig

    cfg = CLIPConfig(img_size=64, patch_size=8, image_resize="shortest_edge", image_resize_size=80,
                     image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    t = ImageTransform.for_config(cfg)
    assert (t.size, t.resize, t.resize_size, t.draft_size, t.train) == (64, "shortest_edge", 80, None, False)
    assert torch.allclose(t.mean.flatten(), torch.tensor([0.5] * 3))
    plain = ImageTransform.for_config(CLIPConfig(img_size=64, patch_size=8), train=True)
    assert (plain.resize, plain.draft_size, plain.train) == ("crop_box", 64, True)
    # The two resizes differ on a non-square image: the one-step box is not transformers' two steps.
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    a = ImageTransform(64, CLIP_MEAN, CLIP_STD, resize="shortest_edge")(img)
    b = ImageTransform(64, CLIP_MEAN, CLIP_STD)(img)
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)


def test_crop_offset_floors_or_rounds_half_to_even() -> None:
    """torchvision's CenterCrop (open_clip) rounds half the margin with Python's round; transformers floors it."""
    from model.image import crop_offset

    assert [crop_offset(m) for m in (0, 1, 15, 29, 31)] == [0, 0, 7, 14, 15]
    assert [crop_offset(m, "round") for m in (0, 1, 15, 29, 31)] == [0, 0, 8, 14, 16]  # 0.5->0, 7.5->8, 14.5->14
    with pytest.raises(ValueError, match="crop offset rule must be 'floor' or 'round'"):
        crop_offset(3, "ceil")
    with pytest.raises(ValueError, match="crop_offset must be 'floor' or 'round'"):
        ImageTransform(8, CLIP_MEAN, CLIP_STD, resize="shortest_edge", crop_offset="ceil")


def test_transform_for_config_crops_where_the_config_says() -> None:
    """A 47x32 image at 32 px: the margin of 15 puts the window at x = 7 (floor) or 8 (round), the shift of one pixel."""
    from model import CLIPConfig
    from model.image import center_crop

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 47, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(center_crop(img, 32)), np.asarray(img)[:, 7:39])
    assert np.array_equal(np.asarray(center_crop(img, 32, offset="round")), np.asarray(img)[:, 8:40])
    floor_cfg = CLIPConfig(img_size=32, patch_size=8, image_resize="shortest_edge")
    round_cfg = floor_cfg.replace(image_crop_offset="round")
    floor, rounded = ImageTransform.for_config(floor_cfg), ImageTransform.for_config(round_cfg)
    assert (floor.crop_offset, rounded.crop_offset) == ("floor", "round")
    plain = ImageTransform(32, CLIP_MEAN, CLIP_STD, resize="shortest_edge")
    a, b = floor(img), rounded(img)
    assert torch.equal(a, plain(img)) and not torch.equal(a, b)
    assert torch.equal(a[:, :, 1:], b[:, :, :-1])  # the same pixels, one column along
    square = Image.fromarray(np.asarray(img)[:, :32])
    assert torch.equal(floor(square), rounded(square))  # no margin, nothing to round
