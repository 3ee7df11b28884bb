"""Zero-shot classification: prompts from labels x templates, the template ensemble, ranking, top-k accuracy.

The one home of this arithmetic: `CLIPInference.classify`, training's evaluation and the
service's /classify all call it, so a label scores the same in a notebook, in an evaluation
report and over HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# A small prompt ensemble: averaging label embeddings over templates is a cheap, reliable
# zero-shot gain (CLIP paper, section 3.1.4).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a {}.",
)


def templates_or_default(templates: Sequence[str] | None) -> tuple[str, ...]:
    """The given templates, or DEFAULT_TEMPLATES when none are given."""
    return tuple(templates) if templates else DEFAULT_TEMPLATES


def label_prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every label, label-major (a template without "{}" gets the label appended)."""
    return [t.replace("{}", label) if "{}" in t else f"{t} {label}" for label in labels for t in templates]


def template_ensemble(prompt_embeddings: np.ndarray, n_labels: int) -> np.ndarray:
    """One vector per label from its prompts' embeddings (label-major): the mean, renormalised."""
    emb = prompt_embeddings.reshape(n_labels, -1, prompt_embeddings.shape[-1]).mean(axis=1)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def softmax_at_temperature(similarities: np.ndarray, logit_scale: float) -> np.ndarray:
    """Probabilities over the last axis of cosine similarities scaled by the model's learned logit scale."""
    if similarities.size == 0:
        return similarities.copy()
    z = similarities * logit_scale
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def best_first(values: Sequence[float] | np.ndarray, top_k: int | None = None) -> list[int]:
    """Positions ordered by value, highest first (equal values keep input order), the first top_k when given."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    return [int(i) for i in (order[:top_k] if top_k else order)]


def rank_labels(
    labels: Sequence[str], scores: Sequence[tuple[float, float]], top_k: int | None = None
) -> list[tuple[str, float, float]]:
    """(label, similarity, probability) per label from its (similarity, probability), most probable first."""
    return [(labels[i], *scores[i]) for i in best_first([p for _, p in scores], top_k)]


def top_k_accuracy(
    image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: how often an image's class is among its k most similar class embeddings."""
    logits = image_emb.float() @ class_emb.float().t()
    order = logits.argsort(dim=1, descending=True)
    out = {}
    for k in ks:
        kk = min(k, class_emb.shape[0])
        out[f"top{k}"] = float((order[:, :kk] == labels.view(-1, 1)).any(dim=1).float().mean()) if len(labels) else 0.0
    return out
