"""model/zeroshot.py: prompts, the template ensemble, ranking at the learned temperature, top-k accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import CLIPInference
from model.zeroshot import (
    DEFAULT_TEMPLATES,
    best_first,
    label_prompts,
    rank_labels,
    softmax_at_temperature,
    template_ensemble,
    templates_or_default,
    top_k_accuracy,
)


def test_prompts_are_label_major_and_slotless_templates_get_the_label_appended() -> None:
    assert label_prompts(["cat", "dog"], ["a {}.", "photo of"]) == ["a cat.", "photo of cat", "a dog.", "photo of dog"]
    assert label_prompts([], ["a {}"]) == []


def test_templates_default_only_when_none_are_given() -> None:
    assert templates_or_default(None) == templates_or_default([]) == DEFAULT_TEMPLATES
    assert templates_or_default(["a {}"]) == ("a {}",)


def test_ensemble_is_the_renormalised_mean_per_label() -> None:
    prompts = np.array([[1, 0], [0, 1], [0, 0], [0, 0], [3, 0], [3, 0]], dtype=np.float32)  # 3 labels x 2 templates
    out = template_ensemble(prompts, 3)
    np.testing.assert_allclose(out[0], [2**-0.5, 2**-0.5], atol=1e-6)
    np.testing.assert_allclose(out[1], [0, 0])  # a zero mean stays zero instead of dividing by zero
    np.testing.assert_allclose(out[2], [1, 0])


def test_softmax_uses_the_scale_and_handles_nothing() -> None:
    sims = np.array([0.5, 0.2, 0.1], dtype=np.float32)
    probs = softmax_at_temperature(sims, 10.0)
    expected = np.exp(10 * sims) / np.exp(10 * sims).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    assert softmax_at_temperature(np.zeros(0, dtype=np.float32), 10.0).shape == (0,)
    big = softmax_at_temperature(np.array([1.0, 0.0]), 1000.0)  # no overflow at a large scale
    assert np.isfinite(big).all() and big[0] == pytest.approx(1.0)


def test_best_first_is_stable_and_cuts_to_top_k() -> None:
    assert best_first([0.1, 0.7, 0.7, 0.3]) == [1, 2, 3, 0]
    assert best_first([0.1, 0.7, 0.7, 0.3], top_k=2) == [1, 2]
    assert best_first([0.1, 0.7], top_k=None) == best_first([0.1, 0.7], top_k=0) == [1, 0]
    assert best_first([]) == []


def test_rank_labels_sorts_by_probability() -> None:
    ranked = rank_labels(["a", "b", "c"], [(0.1, 0.2), (0.3, 0.5), (0.2, 0.3)])
    assert ranked == [("b", 0.3, 0.5), ("c", 0.2, 0.3), ("a", 0.1, 0.2)]
    assert rank_labels(["a", "b", "c"], [(0.1, 0.2), (0.3, 0.5), (0.2, 0.3)], top_k=1) == [("b", 0.3, 0.5)]


def test_top_k_accuracy_caps_k_at_the_class_count() -> None:
    classes = torch.eye(3)
    images = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.9], [0.5, 0.45, 0.1]])
    out = top_k_accuracy(images, torch.tensor([0, 2, 1]), classes, ks=(1, 2, 5))
    assert out == {"top1": pytest.approx(2 / 3), "top2": 1.0, "top5": 1.0}
    assert top_k_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), classes) == {"top1": 0.0, "top5": 0.0}


def test_inference_classify_is_the_library_arithmetic(tiny_checkpoint: Path) -> None:
    """CLIPInference.classify = embed prompts, ensemble, softmax at the learned scale, rank."""
    clip = CLIPInference.load(tiny_checkpoint)
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    labels, templates = ["circle", "square", "triangle"], ["a {}", "a photo of a {}"]
    label_emb = template_ensemble(clip.embed_texts(label_prompts(labels, templates)), len(labels))
    sims = label_emb @ clip.embed_images([image])[0]
    probs = softmax_at_temperature(sims, clip.logit_scale)
    order = best_first(probs)
    got = clip.classify(image, labels, templates)
    assert [p["label"] for p in got] == [labels[i] for i in order]
    np.testing.assert_allclose([p["similarity"] for p in got], sims[order], atol=1e-6)
    np.testing.assert_allclose([p["probability"] for p in got], probs[order], atol=1e-6)
