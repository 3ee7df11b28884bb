"""Reading open_clip models from disk as data: hub folders, bare state dicts, OpenAI's TorchScript .pt.

open_clip itself is never imported (it needs torchvision). Pickles go only through
torch.load(weights_only=True), so nothing a file contains is executed; a TorchScript
archive's tensors are read that way too and its code/ never is.
"""

from __future__ import annotations

import json
import pickletools
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from interop.hf_read import read_license
from interop.open_clip_archs import (
    ARCHS,
    CONFIG_NAME,
    SUPPORTED,
    WEIGHT_NAMES,
    OpenClipError,
)


@dataclass
class OpenClipSource:
    """One open_clip model as read from disk, before any mapping."""

    model_cfg: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    name_or_path: str = ""
    arch: str | None = None
    license: str | None = None
    folder: Path | None = None  # where tokenizer files are looked for


# ---------------------------------------------------------------------------------------------
# reading


def read_source(src: str | Path, *, arch: str | None = None) -> OpenClipSource:
    """A hub folder (open_clip_config.json + weights), a bare state-dict file with arch, or an OpenAI .pt."""
    path = Path(src)
    if not path.exists():
        raise OpenClipError(f"{path}: no such file or folder")
    if arch is not None and arch not in ARCHS:
        raise OpenClipError(f"--arch {arch!r} is not a supported open_clip config; supported: {SUPPORTED}")
    if path.is_dir():
        return _read_hub_folder(path, arch)
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        state = _read_torchscript(path)
        cfg = ARCHS[arch] if arch else _openai_config(state)
        return OpenClipSource(cfg, state, name_or_path=str(path), arch=arch, folder=path.parent)
    state = _unwrap(_read_weights(path))
    refuse_unmapped_keys(state, str(path))
    if arch is None:
        raise OpenClipError(
            f"{path}: a bare state dict says nothing about its activation or preprocessing; "
            f"give --arch NAME (one of {', '.join(ARCHS)})"
        )
    return OpenClipSource(ARCHS[arch], state, name_or_path=str(path), arch=arch, folder=path.parent)


def _read_hub_folder(path: Path, arch: str | None) -> OpenClipSource:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        hint = " (a transformers folder: use hf:DIR)" if (path / "config.json").is_file() else ""
        raise OpenClipError(
            f"{path}: found {found}{hint}; expected open_clip's hub layout ({CONFIG_NAME} with "
            f"{' or '.join(WEIGHT_NAMES)})"
        )
    if arch is not None:
        raise OpenClipError(f"{path} has its own {CONFIG_NAME}; --arch is only for bare state-dict files")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenClipError(f"{config_path}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise OpenClipError(f"{config_path}: expected a JSON object with a 'model_cfg' mapping")
    weights = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
    if weights is None:
        raise OpenClipError(f"{path}: {CONFIG_NAME} but no weights; expected {' or '.join(WEIGHT_NAMES)}")
    state = _unwrap(_read_weights(weights))
    preprocess = config.get("preprocess_cfg") or {}
    if not isinstance(preprocess, dict):
        raise OpenClipError(f"{config_path}: 'preprocess_cfg' must be a mapping")
    return OpenClipSource(
        config["model_cfg"], state, preprocess, name_or_path=str(path), license=read_license(path, {}), folder=path
    )




def _read_weights(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types on bad headers
            raise OpenClipError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure: bad file or a pickle that is more than tensors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OpenClipError(
            f"{path}: not a state dict that loads with torch.load(weights_only=True) ({first}); expected "
            "open_clip's safetensors or .bin, a bare state-dict file or an OpenAI TorchScript .pt"
        ) from exc


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """open_clip training checkpoints: {'state_dict': ...} and DDP's `module.` prefix."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else f"a mapping of {len(obj)} entries, not all tensors"
        raise OpenClipError(f"found {kind}; expected a state dict of tensors (optionally under 'state_dict')")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


# OpenAI's original .pt files are TorchScript archives. Their data.pkl rebuilds module objects
# of classes named __torch__.*; a placeholder stands in for each, so torch.load's weights-only
# unpickler restores the tensors and their attribute names while the archive's code/ is
# never read.
class _ScriptObject:
    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        data_pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if data_pkl is None:
            raise OpenClipError(f"{path}: a TorchScript archive without data.pkl; expected OpenAI's CLIP .pt")
        prefix = data_pkl[: -len("data.pkl")]
        classes = sorted(
            {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(zf.read(data_pkl))
             if op.name == "GLOBAL" and str(arg).startswith("__torch__.")}
        )
        with tempfile.TemporaryDirectory() as tmp:
            repacked = Path(tmp) / "weights.pt"
            with zipfile.ZipFile(repacked, "w", zipfile.ZIP_STORED) as out:
                for name in names:
                    rel = name[len(prefix):]
                    if rel in ("data.pkl", "version", "byteorder") or rel.startswith("data/"):
                        out.writestr(f"archive/{rel}", zf.read(name))
            from torch.jit._pickle import build_intlist

            allowed = [(_ScriptObject, name) for name in classes] + [build_intlist]
            try:
                with torch.serialization.safe_globals(allowed):
                    root = torch.load(repacked, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise OpenClipError(f"{path}: a TorchScript archive whose tensors cannot be read safely ({exc})") from exc
    state: dict[str, torch.Tensor] = {}
    _collect(root, "", state)
    for key in ("attn_mask", "input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    return state


def _collect(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, _ScriptObject):
        state = obj.__dict__.get("state")
        if isinstance(state, dict):
            for key, value in state.items():
                _collect(value, f"{prefix}{key}.", out)
    elif isinstance(obj, dict) and prefix == "":
        for key, value in obj.items():
            _collect(value, f"{key}.", out)


def _openai_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """OpenAI's files carry no config: the shapes give it, with OpenAI's 64-wide heads and QuickGELU."""
    refuse_unmapped_keys(state, "the TorchScript archive")
    try:
        width = state["visual.conv1.weight"].shape[0]
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        text_width = state["ln_final.weight"].shape[0]
        vision_cfg = {
            "image_size": patch * grid,
            "layers": _count_blocks(state, "visual.transformer.resblocks."),
            "width": width,
            "patch_size": patch,
        }
        text_cfg = {
            "context_length": state["positional_embedding"].shape[0],
            "vocab_size": state["token_embedding.weight"].shape[0],
            "width": text_width,
            "heads": text_width // 64,
            "layers": _count_blocks(state, "transformer.resblocks."),
        }
        return {"embed_dim": state["text_projection"].shape[1], "quick_gelu": True,
                "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    except KeyError as exc:
        raise OpenClipError(f"a TorchScript archive without {exc.args[0]}; expected OpenAI's ViT CLIP .pt") from exc


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})



_UNMAPPED_KEYS = (
    ("visual.trunk.", "a timm image tower"),
    ("visual.layer1.", "a ResNet image tower (ModifiedResNet)"),
    ("visual.attnpool.", "a ResNet image tower (ModifiedResNet)"),
    ("text.transformer.embeddings.", "a Hugging Face text tower"),
    ("text.", "a custom text tower"),
    ("text_decoder.", "CoCa's text decoder"),
    ("visual.attn_pool.", "an attentional-pooling image tower (CoCa)"),
    ("logit_bias", "SigLIP's sigmoid logit bias"),
)


def refuse_unmapped_keys(state: dict[str, torch.Tensor], where: str) -> None:
    for prefix, what in _UNMAPPED_KEYS:
        if any(k.startswith(prefix) for k in state):
            raise OpenClipError(f"{where} holds {what} ({prefix}*), which does not map; supported: {SUPPORTED}")
    if not any(k.startswith("visual.") for k in state) or "token_embedding.weight" not in state:
        sample = ", ".join(sorted(state)[:4])
        raise OpenClipError(f"{where}: found tensors named {sample}, ...; expected an open_clip CLIP state dict "
                            "(visual.*, token_embedding.weight, transformer.*)")

