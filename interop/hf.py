"""`model import hf:DIR`: a transformers CLIPModel folder as a clipforge checkpoint.

Reading the folder is interop.hf_read's job, the config and weight mapping
interop.hf_mapping's; the way back (`model export CKPT --to hf:DIR`) is interop.hf_export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interop.hf_mapping import config_from_hf, load_transformers, state_from_hf
from interop.hf_read import (
    check_layout,
    read_hf_tokenizer,
    read_hf_weights,
    read_license,
    read_preprocessing,
)
from model.checkpoint import save_checkpoint
from model.clip import CLIP
from model.errors import CheckpointError, ConfigError
from model.tokenizer import CLIPTokenizer


def read_hf(
    src_dir: str | Path, *, config_changes: dict[str, Any] | None = None, cleaning: str | None = None,
) -> tuple[CLIP, CLIPTokenizer, dict[str, Any]]:
    """A transformers CLIPModel folder as an in-memory clipforge model, tokenizer and source record.

    config_changes and cleaning (the tokenizer's, model.tokenizer.TEXT_CLEANINGS) are for callers
    that converted another format into the folder and know what it cannot say, as open_clip's
    rounded crop offset and text cleaning.
    """
    src = Path(src_dir)
    raw = check_layout(src)
    transformers = load_transformers()
    try:
        hf_cfg = transformers.CLIPConfig.from_pretrained(str(src))
    except Exception as exc:
        raise ConfigError(f"hf:{src}/config.json is not a valid CLIPModel config: {exc}") from exc
    hf_state = read_hf_weights(src)
    tokenizer = read_hf_tokenizer(src, hf_cfg.text_config.max_position_embeddings)
    if "logit_scale" not in hf_state:
        raise CheckpointError("the transformers weights lack logit_scale")
    cfg = config_from_hf(hf_cfg, tokenizer, read_preprocessing(src, hf_cfg.vision_config.image_size),
                         float(hf_state["logit_scale"]))
    if config_changes:
        cfg = cfg.replace(**config_changes)
    if cleaning is not None:
        tokenizer = tokenizer.with_cleaning(cleaning)
    state = state_from_hf(hf_state, cfg)
    model = CLIP(cfg)
    expected = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} does not fit config.json's "
                                  f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    source = {"format": "hf", "name_or_path": raw.get("_name_or_path") or str(src)}
    licence = read_license(src, raw)
    if licence:
        source["license"] = licence
    return model.eval(), tokenizer, source


def import_hf(
    src_dir: str | Path, out_ckpt: str | Path, *, source: dict[str, Any] | None = None,
    config_changes: dict[str, Any] | None = None, cleaning: str | None = None,
) -> str:
    """Write a transformers CLIPModel folder as a clipforge checkpoint; returns its content hash.

    source: keys that replace the recorded provenance (meta["source"]), for callers that
    converted another format into a transformers folder first; config_changes and cleaning
    as read_hf takes them.
    """
    model, tokenizer, found = read_hf(src_dir, config_changes=config_changes, cleaning=cleaning)
    return save_checkpoint(out_ckpt, model, tokenizer, meta={"source": {**found, **(source or {})}})

