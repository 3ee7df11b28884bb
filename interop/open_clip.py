"""open_clip and OpenAI CLIP weights -> a transformers CLIP directory -> a clipforge checkpoint.

open_clip itself is never imported (it needs torchvision); its hub layout, bare state
dicts and OpenAI's TorchScript archives are read as data. Pickles go only through
torch.load(weights_only=True), so nothing a file contains is executed. The conversion
writes what transformers' CLIPModel loads, and interop.hf turns that into a checkpoint,
so both import paths share one mapping into clipforge.
"""

from __future__ import annotations

import gzip
import json
import pickletools
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.errors import ClipforgeError

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

# open_clip 3.3.0's standard ViT CLIP configs (model_configs/*.json):
# embed_dim, image_size, patch_size, vision width, layers, head_width, mlp_ratio, text width, heads, layers.
_VIT_CONFIGS: dict[str, tuple[int, int, int, int, int, int, float, int, int, int]] = {
    "ViT-B-32": (512, 224, 32, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-32-256": (512, 256, 32, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-16": (512, 224, 16, 768, 12, 64, 4.0, 512, 8, 12),
    "ViT-B-16-plus-240": (640, 240, 16, 896, 12, 64, 4.0, 640, 10, 12),
    "ViT-L-14": (768, 224, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-L-14-336": (768, 336, 14, 1024, 24, 64, 4.0, 768, 12, 12),
    "ViT-H-14": (1024, 224, 14, 1280, 32, 80, 4.0, 1024, 16, 24),
    "ViT-g-14": (1024, 224, 14, 1408, 40, 88, 4.3637, 1024, 16, 24),
    "ViT-bigG-14": (1280, 224, 14, 1664, 48, 104, 4.9231, 1280, 20, 32),
}
_QUICKGELU_VARIANTS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14")


def _arch_config(name: str, numbers: tuple, quick_gelu: bool) -> dict[str, Any]:
    embed, image, patch, v_width, v_layers, head_width, mlp_ratio, t_width, t_heads, t_layers = numbers
    vision: dict[str, Any] = {"image_size": image, "layers": v_layers, "width": v_width, "patch_size": patch}
    if head_width != 64:
        vision["head_width"] = head_width
    if mlp_ratio != 4.0:
        vision["mlp_ratio"] = mlp_ratio
    cfg: dict[str, Any] = {"embed_dim": embed}
    if quick_gelu:
        cfg["quick_gelu"] = True
    cfg["vision_cfg"] = vision
    cfg["text_cfg"] = {"context_length": CONTEXT_LENGTH, "vocab_size": VOCAB_SIZE, "width": t_width,
                       "heads": t_heads, "layers": t_layers}
    return cfg


ARCHS: dict[str, dict[str, Any]] = {
    **{name: _arch_config(name, nums, False) for name, nums in _VIT_CONFIGS.items()},
    **{f"{name}-quickgelu": _arch_config(name, _VIT_CONFIGS[name], True) for name in _QUICKGELU_VARIANTS},
}
SUPPORTED = (
    "open_clip ViT CLIPs with open_clip's own text transformer and CLIP's BPE tokenizer "
    f"(--arch one of {', '.join(ARCHS)}; or a hub folder whose open_clip_config.json describes such a model)"
)


class OpenClipError(ClipforgeError, ValueError):
    """An open_clip source that cannot be read or does not map onto a transformers CLIP."""


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
    _refuse_unmapped_keys(state, str(path))
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
        config["model_cfg"], state, preprocess, name_or_path=str(path), license=_readme_license(path), folder=path
    )


def _readme_license(folder: Path) -> str | None:
    """The `license:` line of a hub README's front matter, where the model card states one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    front = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*(\S.*?)\s*$", front.group(1), re.M) if front else None
    return found.group(1).strip("'\"") if found else None


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
    _refuse_unmapped_keys(state, "the TorchScript archive")
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


# ---------------------------------------------------------------------------------------------
# what maps


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


def _refuse_unmapped_keys(state: dict[str, torch.Tensor], where: str) -> None:
    for prefix, what in _UNMAPPED_KEYS:
        if any(k.startswith(prefix) for k in state):
            raise OpenClipError(f"{where} holds {what} ({prefix}*), which does not map; supported: {SUPPORTED}")
    if not any(k.startswith("visual.") for k in state) or "token_embedding.weight" not in state:
        sample = ", ".join(sorted(state)[:4])
        raise OpenClipError(f"{where}: found tensors named {sample}, ...; expected an open_clip CLIP state dict "
                            "(visual.*, token_embedding.weight, transformer.*)")


# Config entries that change the maths of a tower in ways a transformers CLIP cannot express.
_VISION_UNMAPPED = {
    "timm_model_name": "a timm image tower", "ls_init_value": "layer scale", "attentional_pool": "attentional pooling",
    "no_ln_pre": "no ln_pre", "final_ln_after_pool": "ln_post after pooling", "block_type": "custom blocks",
    "qk_norm": "q/k norm", "scaled_cosine_attn": "scaled cosine attention", "scale_heads": "head scales",
    "scale_attn_inner": "inner attention norm", "scale_attn": "attention norm", "scale_fc": "MLP norm",
    "act_kwargs": "activation arguments",
}
_TEXT_UNMAPPED = {
    "hf_model_name": "a Hugging Face text tower", "hf_tokenizer_name": "a tokenizer other than CLIP's BPE",
    "tokenizer_mode": "a tokenizer other than CLIP's BPE", "ls_init_value": "layer scale",
    "embed_cls": "a CLS text embedding (CoCa)", "no_causal_mask": "bidirectional text attention",
    "final_ln_after_pool": "ln_final after pooling", "proj_bias": "a text projection bias",
    "block_type": "custom blocks", "qk_norm": "q/k norm", "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "head scales", "scale_attn_inner": "inner attention norm", "scale_attn": "attention norm",
    "scale_fc": "MLP norm", "act_kwargs": "activation arguments",
}


def _refuse(what: str) -> OpenClipError:
    return OpenClipError(f"this open_clip model has {what}, which does not map; supported: {SUPPORTED}")


def check_supported(cfg: dict[str, Any]) -> None:
    """One line naming the first thing that does not map onto a transformers CLIP."""
    if "multimodal_cfg" in cfg:
        raise _refuse("a multimodal decoder (CoCa)")
    if cfg.get("init_logit_bias") is not None:
        raise _refuse("a logit bias (SigLIP)")
    if cfg.get("custom_text"):
        raise _refuse("a custom text tower (custom_text)")
    vision, text = cfg.get("vision_cfg"), cfg.get("text_cfg")
    if not isinstance(vision, dict) or not isinstance(text, dict) or not isinstance(cfg.get("embed_dim"), int):
        raise OpenClipError("open_clip model_cfg needs embed_dim, vision_cfg and text_cfg")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise _refuse("a ResNet image tower (ModifiedResNet)")
    for key, what in _VISION_UNMAPPED.items():
        if vision.get(key):
            raise _refuse(f"{what} in the image tower ({key})")
    for key, what in _TEXT_UNMAPPED.items():
        if text.get(key):
            raise _refuse(f"{what} in the text tower ({key})")
    if vision.get("pool_type", "tok") != "tok":
        raise _refuse(f"image pooling {vision['pool_type']!r} (only the class token maps)")
    if text.get("pool_type", "argmax") != "argmax":
        raise _refuse(f"text pooling {text['pool_type']!r} (only the end-of-text token maps)")
    if text.get("proj_type", "linear") != "linear":
        raise _refuse(f"text projection {text['proj_type']!r}")
    if not isinstance(vision.get("image_size", 224), int) or not isinstance(vision.get("patch_size", 16), int):
        raise _refuse("a non-square image size or patch")
    if text.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        raise _refuse(f"a {text['vocab_size']}-token vocabulary (CLIP's BPE has {VOCAB_SIZE})")
    for tower, sub in (("image", vision), ("text", text)):
        norm = sub.get("norm_kwargs") or {}
        if set(norm) - {"eps"}:
            raise _refuse(f"layer-norm arguments {sorted(norm)} in the {tower} tower")


def check_preprocess(pp: dict[str, Any]) -> None:
    if pp.get("resize_mode", "shortest") != "shortest":
        raise _refuse(f"resize_mode {pp['resize_mode']!r} (only 'shortest' then a centre crop maps)")
    if pp.get("interpolation", "bicubic") not in ("bicubic", "random"):  # open_clip evaluates 'random' as bicubic
        raise _refuse(f"interpolation {pp['interpolation']!r} (only bicubic maps)")
    if not isinstance(pp.get("size", 0), int):
        raise _refuse("a non-square preprocessing size")


# ---------------------------------------------------------------------------------------------
# mapping to transformers' CLIPModel


def _act(cfg: dict[str, Any]) -> str:
    return "quick_gelu" if cfg.get("quick_gelu") else "gelu"


def _eps(sub: dict[str, Any]) -> float:
    return float((sub.get("norm_kwargs") or {}).get("eps", 1e-5))


def hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json for transformers' CLIPModel, from an open_clip model_cfg."""
    vision, text, embed = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    v_width, t_width = vision.get("width", 768), text.get("width", 512)
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": embed,
        "logit_scale_init_value": 2.6592,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.get("vocab_size", VOCAB_SIZE),
            "hidden_size": t_width,
            "intermediate_size": int(t_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12),
            "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", CONTEXT_LENGTH),
            "hidden_act": _act(cfg),
            "layer_norm_eps": _eps(text),
            "projection_dim": embed,
            "bos_token_id": VOCAB_SIZE - 2,
            "eos_token_id": VOCAB_SIZE - 1,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v_width,
            "intermediate_size": int(v_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision.get("layers", 12),
            "num_attention_heads": v_width // vision.get("head_width", 64),
            "image_size": vision.get("image_size", 224),
            "patch_size": vision.get("patch_size", 16),
            "num_channels": 3,
            "hidden_act": _act(cfg),
            "layer_norm_eps": _eps(vision),
            "projection_dim": embed,
        },
    }


def preprocessor_config(cfg: dict[str, Any], pp: dict[str, Any]) -> dict[str, Any]:
    """open_clip's eval transform (short side to the model's size, centre crop, normalise) as CLIPImageProcessor."""
    size = cfg["vision_cfg"].get("image_size", 224)
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(v) for v in pp.get("mean", OPENAI_MEAN)],
        "image_std": [float(v) for v in pp.get("std", OPENAI_STD)],
        "do_convert_rgb": True,
    }


def _block_map(src: str, dst: str) -> dict[str, str]:
    return {
        f"{src}.ln_1.weight": f"{dst}.layer_norm1.weight", f"{src}.ln_1.bias": f"{dst}.layer_norm1.bias",
        f"{src}.ln_2.weight": f"{dst}.layer_norm2.weight", f"{src}.ln_2.bias": f"{dst}.layer_norm2.bias",
        f"{src}.attn.out_proj.weight": f"{dst}.self_attn.out_proj.weight",
        f"{src}.attn.out_proj.bias": f"{dst}.self_attn.out_proj.bias",
        f"{src}.mlp.c_fc.weight": f"{dst}.mlp.fc1.weight", f"{src}.mlp.c_fc.bias": f"{dst}.mlp.fc1.bias",
        f"{src}.mlp.c_proj.weight": f"{dst}.mlp.fc2.weight", f"{src}.mlp.c_proj.bias": f"{dst}.mlp.fc2.bias",
    }


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hf = hf_config(cfg)
    v, t, embed = hf["vision_config"], hf["text_config"], cfg["embed_dim"]
    grid = v["image_size"] // v["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (v["hidden_size"], 3, v["patch_size"], v["patch_size"]),
        "visual.class_embedding": (v["hidden_size"],),
        "visual.positional_embedding": (grid * grid + 1, v["hidden_size"]),
        "visual.ln_pre.weight": (v["hidden_size"],), "visual.ln_pre.bias": (v["hidden_size"],),
        "visual.ln_post.weight": (v["hidden_size"],), "visual.ln_post.bias": (v["hidden_size"],),
        "visual.proj": (v["hidden_size"], embed),
        "token_embedding.weight": (t["vocab_size"], t["hidden_size"]),
        "positional_embedding": (t["max_position_embeddings"], t["hidden_size"]),
        "ln_final.weight": (t["hidden_size"],), "ln_final.bias": (t["hidden_size"],),
        "text_projection": (t["hidden_size"], embed),
        "logit_scale": (),
    }
    for prefix, sub in (("visual.transformer", v), ("transformer", t)):
        d, m = sub["hidden_size"], sub["intermediate_size"]
        for i in range(sub["num_hidden_layers"]):
            b = f"{prefix}.resblocks.{i}"
            shapes.update({
                f"{b}.ln_1.weight": (d,), f"{b}.ln_1.bias": (d,), f"{b}.ln_2.weight": (d,), f"{b}.ln_2.bias": (d,),
                f"{b}.attn.in_proj_weight": (3 * d, d), f"{b}.attn.in_proj_bias": (3 * d,),
                f"{b}.attn.out_proj.weight": (d, d), f"{b}.attn.out_proj.bias": (d,),
                f"{b}.mlp.c_fc.weight": (m, d), f"{b}.mlp.c_fc.bias": (m,),
                f"{b}.mlp.c_proj.weight": (d, m), f"{b}.mlp.c_proj.bias": (d,),
            })
    return shapes


def check_weights(state: dict[str, torch.Tensor], cfg: dict[str, Any], *, what: str) -> None:
    """Every tensor the config needs, at its shape, and nothing the mapping would drop."""
    expected = _expected_shapes(cfg)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids") and k != "attn_mask"}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise OpenClipError(f"the weights do not match {what}: {len(missing)} tensors missing, e.g. {missing[0]}")
    if extra:
        raise OpenClipError(f"the weights do not match {what}: {len(extra)} tensors it has no place for, e.g. {extra[0]}")
    for key, shape in expected.items():
        got = tuple(state[key].shape)
        if got != shape and not (key == "logit_scale" and state[key].numel() == 1):
            raise OpenClipError(f"the weights do not match {what}: {key} is {got}, expected {shape}")


def hf_state_dict(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """open_clip names and layouts -> CLIPModel's, in float32 (OpenAI's fp16 included)."""
    hf = hf_config(cfg)
    f = {k: v.detach().to(torch.float32) for k, v in state.items()}
    out: dict[str, torch.Tensor] = {
        "vision_model.embeddings.patch_embedding.weight": f["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": f["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": f["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": f["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": f["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": f["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": f["visual.ln_post.bias"],
        "visual_projection.weight": f["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": f["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": f["positional_embedding"],
        "text_model.final_layer_norm.weight": f["ln_final.weight"],
        "text_model.final_layer_norm.bias": f["ln_final.bias"],
        "text_projection.weight": f["text_projection"].t(),
        "logit_scale": f["logit_scale"].reshape(()),
    }
    for src, dst, sub in (("visual.transformer", "vision_model.encoder", hf["vision_config"]),
                          ("transformer", "text_model.encoder", hf["text_config"])):
        for i in range(sub["num_hidden_layers"]):
            s, d = f"{src}.resblocks.{i}", f"{dst}.layers.{i}"
            for a, b in _block_map(s, d).items():
                out[b] = f[a]
            for part, w, bias in zip(("q", "k", "v"), f[f"{s}.attn.in_proj_weight"].chunk(3),
                                     f[f"{s}.attn.in_proj_bias"].chunk(3)):
                out[f"{d}.self_attn.{part}_proj.weight"] = w
                out[f"{d}.self_attn.{part}_proj.bias"] = bias
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# tokenizer files


def _byte_units() -> list[str]:
    """CLIP's (and GPT-2's) printable stand-in for each of the 256 bytes, in byte order of the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    units, extra = [chr(b) for b in printable], 0
    for b in range(256):
        if b not in printable:
            units.append(chr(256 + extra))
            extra += 1
    return units


def clip_bpe_files(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """vocab.json's mapping and merges.txt's lines from open_clip's (OpenAI's) BPE file."""
    try:
        lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise OpenClipError(f"{bpe_gz}: not CLIP's gzipped BPE merges ({exc})") from exc
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = _byte_units()
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges] + [SOT, EOT]
    if len(vocab) != VOCAB_SIZE:
        raise OpenClipError(f"{bpe_gz}: gives {len(vocab)} tokens, CLIP's BPE has {VOCAB_SIZE}")
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _find_bpe(folder: Path | None) -> Path | None:
    if folder is not None and (folder / BPE_NAME).is_file():
        return folder / BPE_NAME
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / BPE_NAME
        if candidate.is_file():
            return candidate
    return None


def write_tokenizer(folder: Path | None, out: Path) -> str:
    """CLIP's tokenizer files into out: the source's own where it has them, else built from the BPE file."""
    if folder is not None and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        for name in ("vocab.json", "merges.txt"):
            (out / name).write_bytes((folder / name).read_bytes())
        source = "the source's vocab.json + merges.txt"
    elif folder is not None and (folder / "tokenizer.json").is_file():
        (out / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
        source = "the source's tokenizer.json"
    else:
        bpe = _find_bpe(folder)
        if bpe is None:
            raise OpenClipError(
                f"no CLIP tokenizer files beside the weights: put vocab.json + merges.txt (or open_clip's {BPE_NAME}) "
                f"in {folder}"
            )
        vocab, merges = clip_bpe_files(bpe)
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        source = str(bpe)
    special = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, **special}),
        encoding="utf-8",
    )
    return source


# ---------------------------------------------------------------------------------------------
# entry points


def convert_to_hf(src: str | Path, out_dir: str | Path, *, arch: str | None = None) -> dict[str, Any]:
    """Write a transformers CLIPModel folder for an open_clip source; returns the provenance for the checkpoint."""
    source = read_source(src, arch=arch)
    check_supported(source.model_cfg)
    _refuse_unmapped_keys(source.state_dict, source.name_or_path)
    pp = dict(source.preprocess_cfg)
    check_preprocess(pp)
    what = arch or (Path(source.name_or_path).name + "'s config")
    check_weights(source.state_dict, source.model_cfg, what=what)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(hf_state_dict(source.state_dict, source.model_cfg), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(source.model_cfg), indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(source.model_cfg, pp), indent=2), encoding="utf-8"
    )
    write_tokenizer(source.folder, out)
    return {"format": "open_clip", "name_or_path": source.name_or_path, "arch": source.arch, "license": source.license}


def import_open_clip(src: str | Path, out: str | Path, arch: str | None = None) -> str:
    """`clipforge model import open_clip:PATH --out CKPT`: through a transformers folder into a checkpoint; its hash."""
    from interop.hf import import_hf

    with tempfile.TemporaryDirectory(prefix="open_clip-") as tmp:
        provenance = convert_to_hf(src, tmp, arch=arch)
        return import_hf(tmp, out, source={k: v for k, v in provenance.items() if v is not None})
