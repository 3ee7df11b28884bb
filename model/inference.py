"""The inference API: load a checkpoint once, then embed, rank and classify in a line each.

The index builder and the web service use this same class, so there is one path from
an image or a string to an embedding.

    clip = CLIPInference.load("runs/x/best")
    clip.classify("cat.jpg", ["cat", "dog"])        # [{"label": "cat", "probability": .93, ...}, ...]
    clip.rank_texts("cat.jpg", ["a cat", "a dog"])  # probabilities per text, in input order
    clip.embed_texts(["a red circle"])              # (1, D) float32, L2-normalised

The zero-shot arithmetic (prompts, template ensemble, ranking) is model/zeroshot.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import zeroshot
from .checkpoint import load_checkpoint
from .clip import CLIP
from .config import Precision
from .image import DEFAULT_MAX_PIXELS, ImageSource, ImageTransform, open_image
from .layers import MLP
from .tokenizer import CLIPTokenizer

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


class CLIPInference:
    def __init__(
        self, model: CLIP, tokenizer: CLIPTokenizer, meta: dict[str, Any] | None = None,
        device: str | torch.device = "cpu", *, max_pixels: int = DEFAULT_MAX_PIXELS, precision: Precision = "fp32",
    ) -> None:
        """precision "bf16" casts `model` itself (in place) to bfloat16, its quick_gelu MLPs folded into one silu
        (layers.MLP.fold_quick_gelu): on CPUs with AMX or AVX512-BF16 its forward passes are faster, and on a
        ViT-B/32-sized model the embeddings measured cosine 0.9999 with fp32's (docs/benchmarks.md)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        if self.dtype == torch.float32:
            self.model = model.to(device).eval()
        else:
            temperature = model.logit_scale.detach().clone()
            for module in model.modules():  # in fp32, before the cast: the folded weights are rounded once
                if isinstance(module, MLP):
                    module.fold_quick_gelu()
            self.model = model.to(device=device, dtype=self.dtype).eval()
            model.logit_scale.data = temperature.to(device)  # stays fp32: in bf16, 100 would read back as 98.9
        self.tokenizer = tokenizer
        self.meta = dict(meta or {})
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        cfg = model.cfg
        self.transform = ImageTransform.for_config(cfg, train=False)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> CLIPInference:
        model, tokenizer, meta = load_checkpoint(checkpoint, device=device)
        return cls(model, tokenizer, meta, device=device, **kwargs)

    # ------------------------------------------------------------------ identity
    @property
    def model_id(self) -> str:
        return str(self.meta.get("content_hash", "unsaved"))

    @property
    def dim(self) -> int:
        return self.model.cfg.align_dim

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def logit_scale(self) -> float:
        return float(self.model.scale().detach())

    # ------------------------------------------------------------------ embedding
    def preprocess(self, image: ImageSource) -> torch.Tensor:
        """Decode (with the pixel-bomb guard) and preprocess one image to (3, S, S)."""
        return self.transform(open_image(image, max_pixels=self.max_pixels, draft_size=self.transform.draft_size))

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Already-preprocessed (B, 3, S, S) pixels -> (B, D) normalised float32 embeddings."""
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._as_output(self.model.encode_image(pixels.to(self.device, dtype=self.dtype)))

    def embed_images(self, images: Sequence[ImageSource] | ImageSource, batch_size: int = 64) -> np.ndarray:
        """PIL images, paths or bytes -> (N, D) normalised float32 embeddings (a single one gives N = 1)."""
        if isinstance(images, (str, Path, bytes, bytearray, Image.Image)) or hasattr(images, "read"):
            images = [images]  # one path is not a sequence of one-letter paths
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start : start + batch_size]])
            out.append(self.embed_pixels(batch))
        return np.concatenate(out)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str] | str, batch_size: int = 256) -> np.ndarray:
        """Strings -> (N, D) normalised float32 embeddings (a single string gives N = 1)."""
        if isinstance(texts, str):
            texts = [texts]  # not one embedding per character
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), batch_size):
            ids = self.tokenizer.encode(list(texts[start : start + batch_size])).to(self.device)
            out.append(self._as_output(self.model.encode_text(ids)))
        return np.concatenate(out)

    def _as_output(self, emb: torch.Tensor) -> np.ndarray:
        """float32 numpy, renormalised in float32 when the forward ran in bf16 (its norms are off by ~1e-3)."""
        emb = emb.float()
        if self.dtype != torch.float32:
            emb = F.normalize(emb, dim=-1)
        return emb.cpu().numpy()

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """One embedding per label: the renormalised mean over prompt templates."""
        prompts = zeroshot.label_prompts(labels, zeroshot.templates_or_default(templates))
        return zeroshot.template_ensemble(self.embed_texts(prompts), len(labels))

    # ------------------------------------------------------------------ ranking
    def scores(self, image_embedding: np.ndarray, text_embeddings: np.ndarray) -> list[tuple[float, float]]:
        """(similarity, probability) of each text for one image, probabilities at the learned temperature."""
        sims = text_embeddings @ image_embedding
        probs = zeroshot.softmax_at_temperature(sims, self.logit_scale)
        return [(float(s), float(p)) for s, p in zip(sims, probs)]

    def rank_texts(self, image: ImageSource, texts: Sequence[str]) -> list[dict[str, Any]]:
        """How well each text describes the image, in input order."""
        img = self.embed_images([image])[0]
        pairs = self.scores(img, self.embed_texts(texts))
        return [{"text": t, "similarity": s, "probability": p} for t, (s, p) in zip(texts, pairs)]

    def rank_images(self, text: str, images: Sequence[ImageSource]) -> list[dict[str, Any]]:
        """Images sorted by similarity to the text (index = position in the input)."""
        txt = self.embed_texts([text])[0]
        sims = self.embed_images(images) @ txt
        probs = zeroshot.softmax_at_temperature(sims, self.logit_scale)
        order = zeroshot.best_first(sims)
        return [{"index": i, "similarity": float(sims[i]), "probability": float(probs[i])} for i in order]

    def classify(
        self, image: ImageSource, labels: Sequence[str] | None = None, templates: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> list[dict[str, Any]]:
        """Zero-shot classification: labels sorted by probability (default: the checkpoint's class names)."""
        labels = list(labels or self.class_names)
        if not labels:
            raise ValueError("no labels given and the checkpoint stores no class names")
        img = self.embed_images([image])[0]
        pairs = self.scores(img, self.label_embeddings(labels, templates))
        ranked = zeroshot.rank_labels(labels, pairs, top_k)
        return [{"label": l, "similarity": s, "probability": p} for l, s, p in ranked]
