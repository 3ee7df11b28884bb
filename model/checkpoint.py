"""Checkpoints: a directory of safetensors weights plus JSON, written atomically.

    model.safetensors   weights (never pickle)
    config.json         CLIPConfig
    tokenizer.json      Hugging Face tokenizer (+ our max_length)
    meta.json           step, metrics, class names, creation time, content hash

The content hash (SHA-256 over weights, config and tokenizer) is the model's identity:
an index records it and refuses to be searched with another model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .clip import CLIP
from .config import CLIPConfig
from .errors import CheckpointError, ClipforgeError, ConfigError
from .fileio import publish_directory, utc_timestamp, write_atomic
from .tokenizer import CLIPTokenizer
from .vision import interpolate_pos_embed

WEIGHTS, CONFIG, TOKENIZER, META = "model.safetensors", "config.json", "tokenizer.json", "meta.json"


def content_hash(directory: str | Path) -> str:
    """SHA-256 over the weights, config and tokenizer files, in that order."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        with open(Path(directory) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    directory: str | Path, model: CLIP, tokenizer: CLIPTokenizer, meta: dict[str, Any] | None = None
) -> str:
    """Write a checkpoint directory atomically and return its content hash.

    Files go to a temporary sibling first, then one rename publishes them; an existing
    checkpoint is swapped out only after the new one is complete, so a kill at any
    moment leaves either the old or the new checkpoint, never a half-written one.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(model.cfg.to_json(), encoding="utf-8")
        tokenizer.save(tmp / TOKENIZER)
        digest = content_hash(tmp)
        meta = dict(meta or {})
        meta.setdefault("created", utc_timestamp())
        meta["content_hash"] = digest
        meta["params"] = model.num_params()
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str), encoding="utf-8")
        publish_directory(tmp, directory)
        return digest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing: not a clipforge checkpoint") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(meta).__name__}")
    return meta


# meta.json keys that say where a model came from (an import's source, the checkpoint it was fine-tuned
# from, its pretrained towers); training carries them on, GET /info shows them.
ORIGIN_KEYS = ("source", "fine_tuned_from", "pretrained_towers")


def model_origin(meta: dict[str, Any]) -> dict[str, Any]:
    """The origin keys a checkpoint's meta holds (empty for a model clipforge trained from scratch)."""
    return {key: meta[key] for key in ORIGIN_KEYS if meta.get(key)}


def update_meta(directory: str | Path, **changes: Any) -> dict[str, Any]:
    """Merge keys into meta.json atomically (e.g. evaluation results). The hash is unaffected."""
    meta = read_meta(directory)
    meta.update(changes)
    write_atomic(Path(directory) / META, json.dumps(meta, indent=2, sort_keys=True, default=str))
    return meta


def check_tokenizer(tokenizer: CLIPTokenizer, cfg: CLIPConfig) -> None:
    """Refuse a tokenizer the model cannot read: ids past its embedding, rows longer than its
    context, or special tokens where the text tower does not look for them (wrong EOT pooling)."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    if tokenizer.max_length > cfg.max_seq_len:
        raise CheckpointError(
            f"tokenizer max_length {tokenizer.max_length} exceeds the model's max_seq_len {cfg.max_seq_len}"
        )
    for field, tok_id in (("pad_token_id", tokenizer.pad_id), ("sot_token_id", tokenizer.sot_id),
                          ("eot_token_id", tokenizer.eot_id)):
        if getattr(cfg, field) != tok_id:
            raise CheckpointError(
                f"tokenizer {field.removesuffix('_token_id')} id is {tok_id} but the config's {field} is "
                f"{getattr(cfg, field)}"
            )


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu", verify: bool = True, img_size: int | None = None
) -> tuple[CLIP, CLIPTokenizer, dict[str, Any]]:
    """Rebuild the model and tokenizer from a checkpoint directory, in eval mode.

    verify recomputes the content hash and refuses a checkpoint whose files changed.
    img_size serves the model at another resolution (position embeddings are interpolated).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    for name in (WEIGHTS, CONFIG, TOKENIZER, META):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name}")
    meta = read_meta(directory)
    if verify:
        expected = meta.get("content_hash")
        actual = content_hash(directory)
        if expected and expected != actual:
            raise CheckpointError(
                f"checkpoint {directory} is corrupt or was modified: content hash {actual[:12]} "
                f"does not match the recorded {str(expected)[:12]}"
            )
        meta["content_hash"] = actual
    try:
        cfg = CLIPConfig.from_dict(json.loads((directory / CONFIG).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory / CONFIG} is not valid JSON: {exc}") from exc
    except ConfigError as exc:
        raise CheckpointError(f"{directory / CONFIG}: {exc}") from exc
    try:
        tokenizer = CLIPTokenizer.load(directory / TOKENIZER)
    except Exception as exc:  # tokenizers raises plain Exception subclasses on bad JSON
        raise CheckpointError(f"{directory / TOKENIZER} is not a valid tokenizer: {exc}") from exc
    check_tokenizer(tokenizer, cfg)
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS} cannot be read: {exc}") from exc

    trained_size = cfg.img_size
    if img_size is not None and img_size != cfg.img_size:
        cfg = cfg.replace(img_size=img_size)
    try:
        model = CLIP(cfg)  # a transformers tower is rebuilt from the config it stores (model/hf_towers.py)
    except ClipforgeError as exc:
        raise CheckpointError(f"checkpoint {directory}: its model cannot be built: {exc}") from exc
    if trained_size != cfg.img_size and "visual.pos_embed" in state:
        state["visual.pos_embed"] = interpolate_pos_embed(state["visual.pos_embed"], cfg.img_size // cfg.patch_size)
    expected_state = model.state_dict()
    missing = sorted(set(expected_state) - set(state))
    unexpected = sorted(set(state) - set(expected_state))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected tensor(s): {', '.join(unexpected[:5])}")
        raise CheckpointError(f"checkpoint {directory} does not match its config ({'; '.join(parts)})")
    for name, tensor in state.items():
        if tensor.shape != expected_state[name].shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)} in the checkpoint but the config "
                f"expects {tuple(expected_state[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return model, tokenizer, meta
