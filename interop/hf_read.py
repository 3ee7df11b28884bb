"""Reading a transformers CLIPModel folder: its config, weights (every hub layout), tokenizer, preprocessing, licence.

Weights are read from safetensors or through torch.load(weights_only=True) only, so
nothing a file holds is executed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from interop.hf_mapping import RESAMPLE_BICUBIC
from model.errors import CheckpointError, ClipforgeError, ConfigError
from model.tokenizer import EOT, SOT, CLIPTokenizer

SUPPORTED = "transformers CLIPModel checkpoints (model_type 'clip': ViT image tower, text transformer)"
EXPECTED_LAYOUT = (
    "config.json (CLIPModel), model.safetensors (or sharded *.safetensors with model.safetensors.index.json, "
    "or pytorch_model.bin), tokenizer.json or vocab.json + merges.txt, preprocessor_config.json"
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _found(src: Path) -> str:
    names = sorted(p.name for p in src.iterdir())[:8]
    return ", ".join(names) if names else "nothing"


def check_layout(src: Path) -> dict[str, Any]:
    """The raw config.json of a CLIPModel directory, or one line saying what is there instead."""
    if not src.is_dir():
        raise CheckpointError(f"hf:{src} is not a directory; expected a transformers CLIPModel folder: {EXPECTED_LAYOUT}")
    if not (src / "config.json").is_file():
        hint = " (an open_clip layout: import it as open_clip:DIR)" if (src / "open_clip_config.json").is_file() else ""
        raise CheckpointError(f"hf:{src} has no config.json{hint}; found {_found(src)}; expected {EXPECTED_LAYOUT}")
    raw = _read_json(src / "config.json")
    model_type = raw.get("model_type")
    if model_type != "clip":
        arch = ", ".join(raw.get("architectures") or []) or "no architectures listed"
        raise ConfigError(f"hf:{src} holds model_type {model_type!r} ({arch}), which is not supported; "
                          f"supported: {SUPPORTED}")
    return raw


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read as plain weights (only tensors are loaded, "
                              f"nothing in it is executed): {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """A CLIPModel's tensors from whichever of the hub's weight layouts the folder has."""
    for index_name, reader in (("model.safetensors.index.json", _safetensors),
                               ("pytorch_model.bin.index.json", _torch_load)):
        index = src / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (src / shard).is_file():
                    raise CheckpointError(f"{index} names shard {shard}, which is missing from {src}")
                state.update(reader(src / shard))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise CheckpointError(f"{index} lists tensors no shard holds: {', '.join(missing[:5])}")
            return state
    if (src / "model.safetensors").is_file():
        return _safetensors(src / "model.safetensors")
    if (src / "pytorch_model.bin").is_file():
        return _torch_load(src / "pytorch_model.bin")
    raise CheckpointError(f"hf:{src} has no weights; found {_found(src)}; expected model.safetensors, sharded "
                          "*.safetensors with model.safetensors.index.json, or pytorch_model.bin")


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_hf_tokenizer(src: Path, max_length: int) -> CLIPTokenizer:
    """CLIP's BPE from tokenizer.json, else vocab.json + merges.txt, with the folder's start and end tokens."""
    names: dict[str, Any] = {}
    for extra in ("special_tokens_map.json", "tokenizer_config.json"):
        if (src / extra).is_file():
            names.update(_read_json(src / extra))
    sot, eot = _token_name(names.get("bos_token")) or SOT, _token_name(names.get("eos_token")) or EOT
    configured = names.get("model_max_length")
    if isinstance(configured, int) and 3 <= configured < max_length:
        max_length = configured
    try:
        if (src / "tokenizer.json").is_file():
            return CLIPTokenizer.from_tokenizer_json((src / "tokenizer.json").read_text(encoding="utf-8"), max_length,
                                                     sot_token=sot, eot_token=eot)
        if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
            if (sot, eot) != (SOT, EOT):
                raise ValueError(f"start/end tokens {sot!r}/{eot!r} are not CLIP's {SOT!r}/{EOT!r}")
            vocab = _read_json(src / "vocab.json")
            merges = (src / "merges.txt").read_text(encoding="utf-8").splitlines()
            return CLIPTokenizer.from_clip_bpe(vocab, merges, max_length)
    except ClipforgeError:
        raise
    except Exception as exc:  # tokenizers raises plain Exceptions on bad files
        raise CheckpointError(f"hf:{src}: the tokenizer cannot be read: {exc}") from exc
    raise CheckpointError(f"hf:{src} has no tokenizer; found {_found(src)}; expected tokenizer.json or "
                          "vocab.json + merges.txt")


def read_preprocessing(src: Path, image_size: int) -> dict[str, Any]:
    """CLIPConfig fields for the folder's CLIPImageProcessor settings (its defaults where the file is absent)."""
    path = src / "preprocessor_config.json"
    pre = _read_json(path) if path.is_file() else {}

    def side(value: Any, key: str) -> int | None:
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            return value.get(key) if key in value else None
        return None

    edge = side(pre.get("size", image_size), "shortest_edge")
    crop_value = pre.get("crop_size", image_size)
    crop = side(crop_value, "height")
    if isinstance(crop_value, dict) and crop_value.get("width", crop) != crop:
        raise ConfigError(f"{path}: crop_size {crop_value} is not square; clipforge crops squares")
    checks = {
        "do_resize": pre.get("do_resize", True) is True,
        "do_center_crop": pre.get("do_center_crop", True) is True,
        "do_rescale": pre.get("do_rescale", True) is True,
        "rescale_factor": abs(float(pre.get("rescale_factor", 1 / 255)) - 1 / 255) < 1e-9,
        "do_normalize": pre.get("do_normalize", True) is True,
        "resample": pre.get("resample", RESAMPLE_BICUBIC) == RESAMPLE_BICUBIC,
        "size": isinstance(edge, int) and edge >= image_size,
        "crop_size": crop == image_size,
    }
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(
                f"{path}: {key} = {pre.get(key)!r} is not supported; clipforge applies CLIPImageProcessor's "
                f"shortest-edge bicubic resize (>= the crop), a centre crop of the model's {image_size} px, "
                "rescale 1/255 and normalisation"
            )
    out: dict[str, Any] = {"image_resize": "shortest_edge", "image_resize_size": edge}
    for key in ("image_mean", "image_std"):
        if key in pre:
            out[key] = tuple(float(v) for v in pre[key])
    return out


def read_license(src: Path, raw: dict[str, Any]) -> str | None:
    """The licence a config.json or the model card's front matter states, if any."""
    if isinstance(raw.get("license"), str):
        return raw["license"]
    readme = src / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        front = re.match(r"---\s*\n(.*?)\n---", text, re.DOTALL)
        found = re.search(r"^license:\s*['\"]?([^'\"\n]+)", front.group(1), re.MULTILINE) if front else None
        if found:
            return found.group(1).strip()
    return None

