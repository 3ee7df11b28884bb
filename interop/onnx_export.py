"""ONNX export of a clipforge checkpoint: `visual.onnx` and `textual.onnx` plus what a runtime needs
besides the graphs (preprocessing, tokenizer, temperature, identity).

    out_dir/
        visual.onnx          pixel_values float32 [batch, 3, H, W] -> image_embeds float32 [batch, D]
        textual.onnx         input_ids int64 [batch, context] -> text_embeds float32 [batch, D]
        tokenizer.json       the checkpoint's tokenizer as a plain `tokenizers` file (start/end tokens,
                             truncation to the context length and right padding included)
        clipforge_onnx.json  preprocessing (open_clip's preprocess_cfg keys), context length, special
                             token ids, the text cleaning to apply before tokenizer.json, logit scale,
                             the checkpoint's content hash

Both graphs return L2-normalised embeddings. Immich's own exporter wraps open_clip's
`encode_image(normalize=True)` / `encode_text(normalize=True)`, so Immich expects unit vectors;
a consumer that compares by cosine (clip-as-service's ranking, an inner-product index) gets the
same result either way; and clipforge's inference API returns unit vectors, so the service can
swap the ONNX path in. Similarities are dot products, probabilities softmax(logit_scale * dot).
File and input names follow clip-as-service (`visual.onnx` with `pixel_values`, `textual.onnx`
with `input_ids`); Immich's folder layout (`visual/model.onnx`, inputs `image` and `text`) would
be a renaming of the same graphs.

Pixels arrive already resized, cropped and normalised (the JSON says how), as both consumers
feed them. The batch axis is dynamic in both graphs and the context axis of `textual.onnx` too
(1 to the model's context length): right padding never changes an embedding, so a runtime may
feed rows padded to the longest caption or to the full context.

onnx, onnxruntime and onnxscript (the `hf` extra) are imported only here and in
interop/onnx_runtime.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import load_checkpoint
from model.clip import CLIP
from model.errors import ClipforgeError
from model.fileio import publish_directory, utc_timestamp
from model.text import eot_positions
from model.tokenizer import CLIPTokenizer

VISUAL, TEXTUAL, TOKENIZER, CONFIG = "visual.onnx", "textual.onnx", "tokenizer.json", "clipforge_onnx.json"
FORMAT = "clipforge-onnx/1"
IMAGE_INPUT, IMAGE_OUTPUT = "pixel_values", "image_embeds"
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeds"
# The export refuses a graph whose onnxruntime output differs from the torch model's by more.
TOLERANCE = 1e-4
_SAMPLE_CAPTIONS = ("a photo of a dog", "a small red circle next to a big blue square on a white background")


class ImageEncoder(nn.Module):
    """The graph of visual.onnx: normalised pixels to unit image embeddings."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextEncoder(nn.Module):
    """The graph of textual.onnx: right-padded token ids to unit text embeddings.

    The text tower's forward first drops the columns after the longest caption, a cut whose
    size depends on the ids' values and so cannot be traced; this is the equivalent its
    docstring gives (final hidden state at each row's end-of-text token), with no cut.
    """

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        text, cfg = self.model.text, self.model.cfg
        hidden = text.hidden_states(input_ids)
        pos = eot_positions(input_ids, cfg.eot_token_id, cfg.pad_token_id)
        feats = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
        return F.normalize(self.model.text_proj(feats), dim=-1)


def _require_onnx() -> Any:
    try:
        import onnx  # noqa: F401 - the exporter needs it
        import onnxruntime
        import onnxscript  # noqa: F401 - the dynamo exporter's op library
    except ImportError as exc:
        raise ClipforgeError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing): pip install 'clipforge[hf]'"
        ) from exc
    return onnxruntime


def _stage_directory(out_dir: Path) -> Path:
    """A private sibling of out_dir to write into; refuses an out_dir that holds anything but an older export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ClipforgeError(f"ONNX output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / CONFIG).is_file():
        raise ClipforgeError(
            f"ONNX output directory {out_dir} is not empty and holds no earlier export ({CONFIG}); "
            "give a new or empty directory"
        )
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise ClipforgeError(f"cannot write the ONNX export to {out_dir}: {exc.strerror or exc}") from exc


def sample_inputs(model: CLIP, tokenizer: CLIPTokenizer, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded pixels and real captions padded to the full context: the trace example and the check input."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, cfg.channel, cfg.img_size, cfg.img_size, generator=gen)
    captions = [_SAMPLE_CAPTIONS[i % len(_SAMPLE_CAPTIONS)] for i in range(batch)]
    ids = tokenizer.encode(captions)
    ids = F.pad(ids, (0, tokenizer.max_length - ids.shape[1]), value=cfg.pad_token_id)
    return pixels, ids


def _translations() -> dict[Any, Any]:
    """ONNX forms of the torch ops the exporter has none for: hypot (the colour-split stem's chroma magnitude)."""
    from onnxscript import opset18 as op

    def hypot(x: Any, y: Any) -> Any:
        return op.Sqrt(op.Add(op.Mul(x, x), op.Mul(y, y)))

    return {torch.ops.aten.hypot.default: hypot, torch.ops.prims.hypot.default: hypot}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints its progress and warns about missing torchvision ops; keep both off the CLI."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _export(module: nn.Module, example: torch.Tensor, path: Path, *, input_name: str, output_name: str,
            dynamic: dict[int, Any]) -> None:
    try:
        with _quiet():
            program = torch.onnx.export(
                module.eval(), (example,), None, input_names=[input_name], output_names=[output_name],
                dynamic_shapes={input_name: dynamic}, dynamo=True, verbose=False, optimize=True,
                custom_translation_table=_translations(),
            )
        # One self-contained file unless the weights pass protobuf's 2 GB limit (then a .data file beside it).
        program.save(str(path), external_data=None)
    except ClipforgeError:
        raise
    except OSError as exc:
        raise ClipforgeError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise ClipforgeError(f"torch.onnx.export failed for {path.name}: {_summary(exc)}") from exc


def _summary(exc: Exception) -> str:
    """The exporter's error text is a long report; its line naming the failing op is the one to show."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if line.startswith("<class ")]
    return (named or lines or [type(exc).__name__])[0]


def _check(ort: Any, path: Path, input_name: str, inputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Largest |onnxruntime - torch| over the given inputs; the export is refused past TOLERANCE."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x, ref in zip(inputs, reference):
        (out,) = session.run(None, {input_name: x.numpy()})
        worst = max(worst, float((torch.from_numpy(out) - ref).abs().max()))
    if not worst <= TOLERANCE:
        raise ClipforgeError(
            f"{path.name} differs from the torch model by {worst:.2e} under onnxruntime (limit {TOLERANCE:g}); "
            "the export is not faithful for this architecture"
        )
    return worst


def onnx_config(model: CLIP, tokenizer: CLIPTokenizer, meta: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """What a runtime needs besides the graphs. `preprocess` uses open_clip's preprocess_cfg keys (as Immich
    reads them) plus the exact clipforge resize (model/image.py): "crop_box" resizes the centred square of
    the short side to `size` in one bicubic step, "shortest_edge" brings the short side to `resize_size`
    (bicubic) and then crops the centre, as transformers' CLIPImageProcessor does, at the offset
    `clipforge_crop_offset` says ("floor": margin // 2; "round": torchvision's int(round(margin / 2)),
    open_clip's). `tokenizer.cleaning` is what runs before tokenizer.json: "none", or "open_clip"
    (ftfy.fix_text, html.unescape twice, whitespace collapse, lowercase: model.tokenizer.open_clip_clean)."""
    cfg = model.cfg
    return {
        "format": FORMAT,
        "created": utc_timestamp(),
        "content_hash": meta["content_hash"],
        "checkpoint": str(checkpoint),
        "embed_dim": cfg.align_dim,
        "normalized": True,
        "logit_scale": float(model.scale().detach()),
        "visual": {"file": VISUAL, "input": IMAGE_INPUT, "output": IMAGE_OUTPUT,
                   "shape": ["batch", cfg.channel, cfg.img_size, cfg.img_size], "dtype": "float32"},
        "textual": {"file": TEXTUAL, "input": TEXT_INPUT, "output": TEXT_OUTPUT,
                    "shape": ["batch", "context"], "dtype": "int64"},
        "preprocess": {
            "size": [cfg.img_size, cfg.img_size], "mode": "RGB", "mean": list(cfg.image_mean),
            "std": list(cfg.image_std), "interpolation": "bicubic", "resize_mode": "shortest", "crop": "center",
            "fill_color": 0, "resize_size": cfg.image_resize_size or cfg.img_size,
            "clipforge_resize": cfg.image_resize, "clipforge_crop_offset": cfg.image_crop_offset,
        },
        "tokenizer": {
            "file": TOKENIZER, "context_length": tokenizer.max_length, "vocab_size": cfg.vocab_size,
            "pad_token_id": cfg.pad_token_id, "sot_token_id": cfg.sot_token_id, "eot_token_id": cfg.eot_token_id,
            "padding": "right", "cleaning": tokenizer.cleaning,
        },
        "class_names": list(meta.get("class_names") or []),
        "source": meta.get("source"),  # where an imported checkpoint came from (None for clipforge's own)
    }


def export_onnx(checkpoint: str | Path, out_dir: str | Path) -> list[Path]:
    """Write visual.onnx, textual.onnx, tokenizer.json and clipforge_onnx.json to out_dir; return their paths.

    Each graph is run under onnxruntime before the directory is published and refused unless it
    matches the torch model within TOLERANCE (batch 2 at the full context, batch 1 at a short one).
    The directory appears complete or not at all; an earlier export there is replaced.
    """
    ort = _require_onnx()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    stage = _stage_directory(out_dir)  # before the (slower) load, so a bad out_dir is reported at once
    try:
        model, tokenizer, meta = load_checkpoint(checkpoint, device="cpu", verify=True)
        pixels, ids = sample_inputs(model, tokenizer)
        short_ids = tokenizer.encode([_SAMPLE_CAPTIONS[0]])
        with torch.no_grad():
            image_ref = [model.encode_image(pixels), model.encode_image(pixels[:1])]
            text_ref = [model.encode_text(ids), model.encode_text(short_ids)]
        batch = torch.export.Dim("batch", min=1)
        context = torch.export.Dim("context", min=1, max=tokenizer.max_length)
        _export(ImageEncoder(model), pixels, stage / VISUAL, input_name=IMAGE_INPUT, output_name=IMAGE_OUTPUT,
                dynamic={0: batch})
        _export(TextEncoder(model), ids, stage / TEXTUAL, input_name=TEXT_INPUT, output_name=TEXT_OUTPUT,
                dynamic={0: batch, 1: context})
        _check(ort, stage / VISUAL, IMAGE_INPUT, [pixels, pixels[:1]], image_ref)
        _check(ort, stage / TEXTUAL, TEXT_INPUT, [ids, short_ids], text_ref)
        (stage / TOKENIZER).write_text(tokenizer.tokenizer.to_str(), encoding="utf-8")
        config = onnx_config(model, tokenizer, meta, checkpoint)
        (stage / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        names = sorted(p.name for p in stage.iterdir())
        publish_directory(stage, out_dir)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise ClipforgeError(f"cannot write the ONNX export to {out_dir}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return [out_dir / name for name in names]
