"""`clipforge model ...`: inspect presets and checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .clip import CLIP
from .config import PRESETS, CLIPConfig, preset_config
from .errors import CheckpointError, ConfigError


def _describe(cfg: CLIPConfig) -> dict:
    with torch.device("meta"):
        model = CLIP(cfg)
    counts = model.num_params()
    return {
        "params_image": counts["image"],
        "params_text": counts["text"],
        "params_total": counts["total"],
        "gflops_per_image": model.flops_per_image() / 1e9,
        "gflops_per_text": model.flops_per_text() / 1e9,
    }


def _checkpoint_config(directory: Path) -> CLIPConfig:
    """The config of a checkpoint directory, without loading its weights."""
    path = directory / "config.json"
    try:
        return CLIPConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing: not a clipforge checkpoint") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _image_tower_text(cfg: CLIPConfig) -> str:
    if cfg.image_tower == "hf":
        return f"{cfg.img_size}px, vision transformers {cfg.image_tower_config['model_type']} ({cfg.img_dim} features)"
    return f"{cfg.img_size}px/{cfg.patch_size}, vision {cfg.img_dim}x{cfg.img_n_layers} ({cfg.img_n_heads} heads)"


def _text_tower_text(cfg: CLIPConfig) -> str:
    if cfg.text_tower == "hf":
        return f"text transformers {cfg.text_tower_config['model_type']} ({cfg.text_dim} wide, {cfg.text_pool} pooled)"
    return (f"text {cfg.text_dim}x{cfg.text_n_layers} ({cfg.text_n_heads} heads, {cfg.text_n_kv_heads} kv)")


def cmd_info(args: argparse.Namespace) -> int:
    target = args.preset
    if Path(target).is_dir():
        cfg = _checkpoint_config(Path(target))
    else:
        cfg = preset_config(target)
    info = _describe(cfg)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), **info}, indent=2))
        return 0
    print(f"{target}: image {_image_tower_text(cfg)}, {_text_tower_text(cfg)}, "
          f"{cfg.max_seq_len} tokens, vocab {cfg.vocab_size}, embed {cfg.align_dim}")
    print(f"  parameters  image {info['params_image'] / 1e6:8.2f} M   text {info['params_text'] / 1e6:8.2f} M   "
          f"total {info['params_total'] / 1e6:8.2f} M")
    print(f"  GFLOPs      per image {info['gflops_per_image']:8.3f}   per text ({cfg.max_seq_len} tokens) "
          f"{info['gflops_per_text']:8.3f}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in PRESETS:
        info = _describe(preset_config(name))
        print(f"{name:10s} {info['params_total'] / 1e6:8.2f} M params  "
              f"{info['gflops_per_image']:7.3f} GFLOPs/image  {info['gflops_per_text']:7.3f} GFLOPs/text")
    return 0


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Adds `model info` and `model presets`; returns the action so other packages can add actions (import, export)."""
    parser = sub.add_parser("model", help="inspect, import and export models")
    msub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    msub.required = True
    info = msub.add_parser("info", help="parameter counts and GFLOPs of a preset or checkpoint")
    info.add_argument("preset", help=f"preset name ({', '.join(PRESETS)}) or checkpoint directory")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    presets = msub.add_parser("presets", help="list the named presets")
    presets.set_defaults(func=cmd_presets)
    return msub
