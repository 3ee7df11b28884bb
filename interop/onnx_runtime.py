"""Running an ONNX export (interop/onnx_export.py) under onnxruntime, for the service's ONNX path.

    encoder = OnnxEncoder("exports/shapes-onnx", threads=2)
    encoder.encode_images(pixels)   # (B, 3, S, S) preprocessed pixels -> (B, D) unit float32
    encoder.encode_texts(ids)       # (B, T) right-padded token ids -> (B, D) unit float32

The inputs are what CLIPInference feeds its torch model (ImageTransform pixels, CLIPTokenizer
ids), and the outputs equal its embed_pixels / embed_texts within the export's tolerance, so
the service can swap one for the other; `model_id` is the checkpoint's content hash, which
indexes are bound to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.errors import ClipforgeError
from model.text import eot_positions

from .onnx_export import CONFIG, FORMAT


class OnnxEncoder:
    """Both graphs of one export in onnxruntime sessions on the CPU (or the providers given)."""

    def __init__(
        self, directory: str | Path, *, threads: int | None = None, providers: list[str] | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ClipforgeError("the ONNX path needs onnxruntime: pip install 'clipforge[hf]'") from exc
        directory = Path(directory)
        self.config = _read_config(directory)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers are not the user's concern
        if threads is not None:
            if threads < 1:
                raise ClipforgeError(f"threads must be at least 1, got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.directory = directory
        self._visual = _session(ort, directory, self.config["visual"], options, providers)
        self._textual = _session(ort, directory, self.config["textual"], options, providers)
        tok = self.config["tokenizer"]
        self.context_length = int(tok["context_length"])
        self._pad, self._eot, self._vocab = int(tok["pad_token_id"]), int(tok["eot_token_id"]), int(tok["vocab_size"])
        self._image_shape = tuple(self.config["visual"]["shape"][1:])

    # ------------------------------------------------------------------ identity
    @property
    def model_id(self) -> str:
        return str(self.config["content_hash"])

    @property
    def dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def logit_scale(self) -> float:
        return float(self.config["logit_scale"])

    # ------------------------------------------------------------------ encoding
    def encode_images(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """Preprocessed (B, C, S, S) pixels -> (B, D) L2-normalised float32 embeddings."""
        x = _as_numpy(pixels, np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self._image_shape:
            raise ClipforgeError(f"pixels must have shape (batch, {', '.join(map(str, self._image_shape))}), "
                                 f"got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._visual.run(None, {self.config["visual"]["input"]: x})[0]

    def encode_texts(self, ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """Right-padded (B, T) token ids, T <= context_length -> (B, D) L2-normalised float32 embeddings.

        Columns after the last end-of-text token are dropped first, as the torch text tower does:
        they change no embedding and would only cost time.
        """
        x = _as_numpy(ids, np.int64)
        if x.ndim != 2 or not 1 <= x.shape[1] <= self.context_length:
            raise ClipforgeError(f"token ids must have shape (batch, 1..{self.context_length}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if x.min() < 0 or x.max() >= self._vocab:
            raise ClipforgeError(f"token ids must lie in [0, {self._vocab}), got {x.min()}..{x.max()}")
        last = int(eot_positions(torch.from_numpy(x), self._eot, self._pad).max())
        x = np.ascontiguousarray(x[:, : last + 1])
        return self._textual.run(None, {self.config["textual"]["input"]: x})[0]


def _as_numpy(value: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value, dtype=dtype)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.is_file():
        raise ClipforgeError(f"{directory} is not a clipforge ONNX export: {CONFIG} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClipforgeError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ClipforgeError(f"{path} is format {found!r}; this clipforge reads {FORMAT!r}")
    return config


def _session(ort: Any, directory: Path, graph: dict[str, Any], options: Any, providers: list[str]) -> Any:
    path = directory / graph["file"]
    if not path.is_file():
        raise ClipforgeError(f"ONNX export {directory} is missing {graph['file']}")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        raise ClipforgeError(f"{path} cannot be loaded by onnxruntime: {exc}") from exc
