"""CLIPInference: one loaded checkpoint, then embed, rank and classify in a line each."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import (
    DEFAULT_TEMPLATES,
    CLIPInference,
    ImageError,
    ImageTooLargeError,
    content_hash,
)


@pytest.fixture(scope="module")
def clip(tiny_checkpoint: Path) -> CLIPInference:
    return CLIPInference.load(tiny_checkpoint)


def _images() -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (250, 250, 0)]
    imgs = []
    for i, c in enumerate(colours):
        img = Image.new("RGB", (48 + 8 * i, 40), (255, 255, 255))
        img.paste(Image.new("RGB", (20, 20), c), (10 + i, 8))
        imgs.append(img)
    return imgs


def test_identity_and_metadata(clip: CLIPInference, tiny_checkpoint: Path) -> None:
    assert clip.model_id == content_hash(tiny_checkpoint)
    assert clip.dim == clip.model.cfg.align_dim == 128
    assert clip.class_names == ["circle", "square", "triangle"]
    assert clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert not clip.model.training


def test_embed_images_accepts_pil_paths_bytes_and_files(clip: CLIPInference, tmp_path: Path) -> None:
    img = _images()[0]
    path = tmp_path / "a.png"
    img.save(path)
    sources = [img, path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())]
    emb = clip.embed_images(sources)
    assert emb.shape == (5, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for row in emb[1:]:
        np.testing.assert_allclose(row, emb[0], atol=1e-6)


def test_batching_does_not_change_embeddings(clip: CLIPInference) -> None:
    imgs = _images()
    together = clip.embed_images(imgs, batch_size=64)
    one_by_one = clip.embed_images(imgs, batch_size=1)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    texts = ["a red circle", "a big blue square with a long caption", "green", ""]
    np.testing.assert_allclose(clip.embed_texts(texts), np.concatenate([clip.embed_texts([t]) for t in texts]),
                               atol=1e-5)
    assert clip.embed_images([]).shape == (0, 128) and clip.embed_texts([]).shape == (0, 128)


def test_embed_pixels_matches_the_model(clip: CLIPInference) -> None:
    pixels = torch.stack([clip.preprocess(im) for im in _images()])
    assert pixels.shape == (4, 3, 32, 32)
    with torch.no_grad():
        expected = clip.model.encode_image(pixels).numpy()
    np.testing.assert_allclose(clip.embed_pixels(pixels), expected, atol=1e-6)
    assert clip.embed_pixels(pixels[:0]).shape == (0, 128)


def test_rank_texts_keeps_input_order_and_is_a_distribution(clip: CLIPInference) -> None:
    texts = ["a red square", "a blue circle", "a green triangle"]
    ranked = clip.rank_texts(_images()[0], texts)
    assert [r["text"] for r in ranked] == texts
    assert sum(r["probability"] for r in ranked) == pytest.approx(1.0)
    img = clip.embed_images([_images()[0]])[0]
    sims = clip.embed_texts(texts) @ img
    np.testing.assert_allclose([r["similarity"] for r in ranked], sims, atol=1e-5)
    logits = clip.logit_scale * sims
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([r["probability"] for r in ranked], expected, atol=1e-6)


def test_rank_images_sorts_by_similarity(clip: CLIPInference) -> None:
    ranked = clip.rank_images("a red square", _images())
    assert sorted(r["index"] for r in ranked) == [0, 1, 2, 3]
    sims = [r["similarity"] for r in ranked]
    assert sims == sorted(sims, reverse=True)
    assert sum(r["probability"] for r in ranked) == pytest.approx(1.0)


def test_label_embeddings_average_the_templates(clip: CLIPInference) -> None:
    labels = ["circle", "square"]
    emb = clip.label_embeddings(labels, ["a {}.", "a photo of a {}"])
    assert emb.shape == (2, 128)
    manual = clip.embed_texts(["a circle.", "a photo of a circle"]).mean(axis=0)
    np.testing.assert_allclose(emb[0], manual / np.linalg.norm(manual), atol=1e-5)
    # A template without a slot gets the label appended.
    np.testing.assert_allclose(clip.label_embeddings(["circle"], ["a photo of a"])[0],
                               clip.embed_texts(["a photo of a circle"])[0], atol=1e-5)
    assert len(DEFAULT_TEMPLATES) >= 3 and all("{}" in t for t in DEFAULT_TEMPLATES)


def test_classify_defaults_to_class_names_and_sorts(clip: CLIPInference) -> None:
    preds = clip.classify(_images()[1])
    assert sorted(p["label"] for p in preds) == ["circle", "square", "triangle"]
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)
    top = clip.classify(_images()[1], ["cat", "dog", "bird"], templates=["a {}"], top_k=2)
    assert len(top) == 2 and {p["label"] for p in top} <= {"cat", "dog", "bird"}


def test_classify_without_labels_is_refused(tiny_checkpoint: Path) -> None:
    clip = CLIPInference.load(tiny_checkpoint)
    clip.meta["class_names"] = []
    with pytest.raises(ValueError, match="no labels"):
        clip.classify(_images()[0])


def test_bad_images_raise_image_errors(clip: CLIPInference, tiny_checkpoint: Path) -> None:
    with pytest.raises(ImageError):
        clip.embed_images([b"not an image"])
    small_limit = CLIPInference.load(tiny_checkpoint, max_pixels=1000)
    with pytest.raises(ImageTooLargeError):
        small_limit.preprocess(_images()[0])


def test_single_items_and_empty_lists(clip: CLIPInference, tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    _images()[0].save(path)
    single = clip.embed_images(str(path))
    assert single.shape == (1, 128)
    np.testing.assert_allclose(single, clip.embed_images([path]), atol=1e-6)
    assert clip.embed_images(_images()[0]).shape == (1, 128)
    assert clip.embed_texts("a red circle").shape == (1, 128)
    assert clip.rank_texts(_images()[0], []) == []
    assert clip.rank_images("a red circle", []) == []
