"""transformers CLIPModel directories in and out: `model import hf:DIR` and `model export CKPT --to hf:DIR`.

The mapping is exact: a CLIPModel's ViT towers are clipforge towers with q/k/v fused into
one projection, QuickGELU or GELU, LayerNorm eps 1e-5, learned positions, CLS pooling after
ln_post and pooling at the first end-of-text token; the tokenizer is CLIP's BPE and the
preprocessing transformers' CLIPImageProcessor. Weights are read from safetensors or through
torch.load(weights_only=True) only. transformers is imported here and nowhere else.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model.checkpoint import load_checkpoint, save_checkpoint
from model.clip import CLIP
from model.config import CLIPConfig
from model.errors import CheckpointError, ClipforgeError, ConfigError
from model.fileio import publish_directory
from model.tokenizer import EOT, SOT, CLIPTokenizer

SUPPORTED = "transformers CLIPModel checkpoints (model_type 'clip': ViT image tower, text transformer)"
EXPECTED_LAYOUT = (
    "config.json (CLIPModel), model.safetensors (or sharded *.safetensors with model.safetensors.index.json, "
    "or pytorch_model.bin), tokenizer.json or vocab.json + merges.txt, preprocessor_config.json"
)
_RESAMPLE_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as preprocessor_config.json stores it


# --------------------------------------------------------------------------- reading a directory
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


def _check_layout(src: Path) -> dict[str, Any]:
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


def _preprocessing(src: Path, image_size: int) -> dict[str, Any]:
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
        "resample": pre.get("resample", _RESAMPLE_BICUBIC) == _RESAMPLE_BICUBIC,
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


def _license(src: Path, raw: dict[str, Any]) -> str | None:
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


# --------------------------------------------------------------------------- config and weight mapping
def config_from_hf(hf: Any, tokenizer: CLIPTokenizer, preprocessing: dict[str, Any],
                   logit_scale: float) -> CLIPConfig:
    """The CLIPConfig of a transformers CLIPConfig; refuses (naming the field) what clipforge cannot run exactly."""
    v, t = hf.vision_config, hf.text_config
    acts = {v.hidden_act, t.hidden_act}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise ConfigError(f"hidden_act {v.hidden_act!r} (vision) / {t.hidden_act!r} (text) is not supported: "
                          "clipforge runs 'gelu' or 'quick_gelu', the same in both towers")
    if v.layer_norm_eps != t.layer_norm_eps:
        raise ConfigError(f"layer_norm_eps differs between the towers ({v.layer_norm_eps} / {t.layer_norm_eps}); "
                          "clipforge uses one eps")
    for name, tower in (("vision", v), ("text", t)):
        if int(tower.hidden_size * (tower.intermediate_size / tower.hidden_size)) != tower.intermediate_size:
            raise ConfigError(f"{name}_config intermediate_size {tower.intermediate_size} is not a whole "
                              f"multiple clipforge can express from hidden_size {tower.hidden_size}")
    eos = t.eos_token_id
    if eos == 2 and tokenizer.eot_id != 2:
        # Older configs: transformers pools at argmax(ids), the first EOT only when EOT has the largest id.
        if tokenizer.eot_id != tokenizer.vocab_size - 1:
            raise ConfigError("text_config eos_token_id 2 pools at argmax(ids), but the tokenizer's end token "
                              f"{tokenizer.eot_id} is not its largest id")
    elif eos != tokenizer.eot_id:
        raise ConfigError(f"text_config eos_token_id {eos} is not the tokenizer's end-of-text id {tokenizer.eot_id}")
    fields: dict[str, Any] = {
        "eps": float(v.layer_norm_eps), "mlp_act": v.hidden_act, "align_dim": hf.projection_dim,
        "init_temperature": math.exp(-hf.logit_scale_init_value),
        # The imported temperature must not be clamped (transformers never clamps it).
        "max_logit_scale": max(100.0, math.exp(logit_scale) * (1 + 1e-6)),
        "img_size": v.image_size, "patch_size": v.patch_size, "channel": v.num_channels,
        "img_dim": v.hidden_size, "img_n_heads": v.num_attention_heads, "img_n_layers": v.num_hidden_layers,
        "img_mlp_ratio": v.intermediate_size / v.hidden_size, "img_pool": "cls", "img_stem": "patch",
        "vocab_size": t.vocab_size, "max_seq_len": t.max_position_embeddings, "text_dim": t.hidden_size,
        "text_n_heads": t.num_attention_heads, "text_n_kv_heads": t.num_attention_heads,
        "text_n_layers": t.num_hidden_layers, "text_mlp_ratio": t.intermediate_size / t.hidden_size,
        "text_pos": "learned", "pad_token_id": tokenizer.pad_id, "sot_token_id": tokenizer.sot_id,
        "eot_token_id": tokenizer.eot_id, **preprocessing,
    }
    return CLIPConfig.from_dict({k: val for k, val in fields.items() if val is not None})


_BLOCK = {  # clipforge block parameter -> transformers encoder layer parameter (q/k/v handled apart)
    "attn.proj": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
    "mlp.fc": "mlp.fc1", "mlp.proj": "mlp.fc2",
}
_TOWERS = (("visual", "vision_model", "img_n_layers"), ("text", "text_model", "text_n_layers"))
_SINGLE = {  # clipforge name -> transformers name, same shape
    "visual.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.norm_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.norm_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.norm.weight": "vision_model.post_layernorm.weight",
    "visual.norm.bias": "vision_model.post_layernorm.bias",
    "image_proj.weight": "visual_projection.weight",
    "text.tok_embed.weight": "text_model.embeddings.token_embedding.weight",
    "text.norm.weight": "text_model.final_layer_norm.weight",
    "text.norm.bias": "text_model.final_layer_norm.bias",
    "text_proj.weight": "text_projection.weight",
    "logit_scale": "logit_scale",
}


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict as clipforge's, in float32; unknown or missing tensors are named."""
    src = {k.removeprefix("clip."): v for k, v in hf_state.items()}
    for key in [k for k in src if k.endswith("embeddings.position_ids")]:  # a buffer older checkpoints saved
        ids = src.pop(key)
        if not torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel())):
            raise CheckpointError(f"{key} is not 0..{ids.numel() - 1}; positions that are not in order are not supported")
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise CheckpointError(f"the transformers weights lack {name}")
        used.add(name)
        return src[name].float()

    out = {ours: take(theirs) for ours, theirs in _SINGLE.items()}
    out["visual.patch_embed.bias"] = torch.zeros(cfg.img_dim)  # transformers' patch embedding has no bias
    out["visual.cls_token"] = take("vision_model.embeddings.class_embedding").view(1, 1, -1)
    out["visual.pos_embed"] = take("vision_model.embeddings.position_embedding.weight").unsqueeze(0)
    out["text.pos_embed"] = take("text_model.embeddings.position_embedding.weight").unsqueeze(0)
    for ours_tower, hf_tower, depth in _TOWERS:
        for i in range(getattr(cfg, depth)):
            theirs, mine = f"{hf_tower}.encoder.layers.{i}", f"{ours_tower}.blocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{mine}.attn.qkv.{kind}"] = torch.cat(
                    [take(f"{theirs}.self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")])
                for ours_name, hf_name in _BLOCK.items():
                    out[f"{mine}.{ours_name}.{kind}"] = take(f"{theirs}.{hf_name}.{kind}")
    unexpected = sorted(set(src) - used)
    if unexpected:
        raise CheckpointError(f"the transformers weights hold tensors a CLIPModel of this config has not: "
                              f"{', '.join(unexpected[:5])}")
    return out


def state_to_hf(model: CLIP) -> dict[str, torch.Tensor]:
    """clipforge's state dict under transformers' names; the patch bias moves into the patch positions."""
    cfg, state = model.cfg, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {theirs: state[ours].clone() for ours, theirs in _SINGLE.items()}
    out["logit_scale"] = out["logit_scale"].clamp(max=math.log(cfg.max_logit_scale))
    pos = state["visual.pos_embed"][0].clone()
    pos[1:] += state["visual.patch_embed.bias"]  # added to every patch token, never to CLS
    out["vision_model.embeddings.position_embedding.weight"] = pos
    out["vision_model.embeddings.class_embedding"] = state["visual.cls_token"].reshape(-1).clone()
    out["text_model.embeddings.position_embedding.weight"] = state["text.pos_embed"][0].clone()
    for ours_tower, hf_tower, depth in _TOWERS:
        for i in range(getattr(cfg, depth)):
            theirs, mine = f"{hf_tower}.encoder.layers.{i}", f"{ours_tower}.blocks.{i}"
            for kind in ("weight", "bias"):
                for p, part in zip("qkv", state[f"{mine}.attn.qkv.{kind}"].chunk(3)):
                    out[f"{theirs}.self_attn.{p}_proj.{kind}"] = part.clone()
                for ours_name, hf_name in _BLOCK.items():
                    out[f"{theirs}.{hf_name}.{kind}"] = state[f"{mine}.{ours_name}.{kind}"].clone()
    return out


# --------------------------------------------------------------------------- import
def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ClipforgeError("hf: interop needs transformers: pip install 'clipforge[hf]'") from exc
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def read_hf(src_dir: str | Path) -> tuple[CLIP, CLIPTokenizer, dict[str, Any]]:
    """A transformers CLIPModel folder as an in-memory clipforge model, tokenizer and source record."""
    src = Path(src_dir)
    raw = _check_layout(src)
    transformers = _transformers()
    try:
        hf_cfg = transformers.CLIPConfig.from_pretrained(str(src))
    except Exception as exc:
        raise ConfigError(f"hf:{src}/config.json is not a valid CLIPModel config: {exc}") from exc
    hf_state = read_hf_weights(src)
    tokenizer = read_hf_tokenizer(src, hf_cfg.text_config.max_position_embeddings)
    if "logit_scale" not in hf_state:
        raise CheckpointError("the transformers weights lack logit_scale")
    cfg = config_from_hf(hf_cfg, tokenizer, _preprocessing(src, hf_cfg.vision_config.image_size),
                         float(hf_state["logit_scale"]))
    state = state_from_hf(hf_state, cfg)
    model = CLIP(cfg)
    expected = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} does not fit config.json's "
                                  f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    source = {"format": "hf", "name_or_path": raw.get("_name_or_path") or str(src)}
    licence = _license(src, raw)
    if licence:
        source["license"] = licence
    return model.eval(), tokenizer, source


def import_hf(src_dir: str | Path, out_ckpt: str | Path, *, source: dict[str, Any] | None = None) -> str:
    """Write a transformers CLIPModel folder as a clipforge checkpoint; returns its content hash.

    source: keys that replace the recorded provenance (meta["source"]), for callers that
    converted another format into a transformers folder first.
    """
    model, tokenizer, found = read_hf(src_dir)
    return save_checkpoint(out_ckpt, model, tokenizer, meta={"source": {**found, **(source or {})}})


# --------------------------------------------------------------------------- export
def check_exportable(model: CLIP, tokenizer: CLIPTokenizer) -> None:
    """Refuse, naming the field, what a transformers CLIPModel cannot express."""
    cfg = model.cfg
    refusals = [
        (cfg.text_pos != "learned", f"text_pos {cfg.text_pos!r}: rotary positions have no transformers CLIP equivalent"),
        (cfg.text_n_kv_heads != cfg.text_n_heads,
         (f"text_n_kv_heads {cfg.text_n_kv_heads} < text_n_heads {cfg.text_n_heads}: grouped-query attention has "
          "no transformers CLIP equivalent")),
        (cfg.img_color_layer is not None, "img_color_layer: the colour-split stem has no transformers CLIP equivalent"),
        (cfg.img_stem != "patch", f"img_stem {cfg.img_stem!r}: the convolutional stem has no transformers CLIP equivalent"),
        (cfg.img_pool != "cls", f"img_pool {cfg.img_pool!r}: transformers CLIP pools the CLS token"),
        (cfg.num_classes is not None, "num_classes: a classification head has no place in a transformers CLIPModel"),
        (tokenizer.end_of_word_suffix != "</w>" or (tokenizer.special_tokens[1:] != (SOT, EOT)),
         ("tokenizer: transformers' CLIPTokenizer rebuilds CLIP's BPE pipeline, so only CLIP's BPE tokenizer "
          "(an imported model's) exports; this one is clipforge's trained byte-level BPE")),
    ]
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"cannot export to transformers: {why}")


def hf_config(cfg: CLIPConfig, tokenizer: CLIPTokenizer) -> Any:
    transformers = _transformers()
    common = {"hidden_act": cfg.mlp_act, "layer_norm_eps": cfg.eps, "attention_dropout": 0.0, "dropout": 0.0}
    return transformers.CLIPConfig(
        text_config={
            **common, "vocab_size": cfg.vocab_size, "hidden_size": cfg.text_dim,
            "intermediate_size": int(cfg.text_dim * cfg.text_mlp_ratio), "num_hidden_layers": cfg.text_n_layers,
            "num_attention_heads": cfg.text_n_heads, "max_position_embeddings": cfg.max_seq_len,
            "bos_token_id": tokenizer.sot_id, "eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.pad_id,
            "projection_dim": cfg.align_dim,
        },
        vision_config={
            **common, "hidden_size": cfg.img_dim, "intermediate_size": int(cfg.img_dim * cfg.img_mlp_ratio),
            "num_hidden_layers": cfg.img_n_layers, "num_attention_heads": cfg.img_n_heads,
            "num_channels": cfg.channel, "image_size": cfg.img_size, "patch_size": cfg.patch_size,
            "projection_dim": cfg.align_dim,
        },
        projection_dim=cfg.align_dim, logit_scale_init_value=math.log(1 / cfg.init_temperature),
    )


def preprocessor_config(cfg: CLIPConfig) -> dict[str, Any]:
    """CLIPImageProcessor settings; a "crop_box" model gets transformers' two-step equivalent (equal on square images)."""
    return {
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": cfg.image_resize_size or cfg.img_size}, "resample": _RESAMPLE_BICUBIC,
        "do_center_crop": True, "crop_size": {"height": cfg.img_size, "width": cfg.img_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std),
    }


def _write_tokenizer(tokenizer: CLIPTokenizer, cfg: CLIPConfig, out: Path) -> None:
    """vocab.json + merges.txt (what every transformers version reads) and the tokenizer config."""
    data = json.loads(tokenizer.tokenizer.to_str())
    vocab = data["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": cfg.max_seq_len}, indent=2),
        encoding="utf-8")


_PROBE_TEXTS = ("a photo of a dog.", "Two CATS, sleeping on a sofa!", "café 123 🐱 don't")


def export_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint as a folder transformers loads with CLIPModel, CLIPTokenizer and CLIPImageProcessor.

    The folder is built aside and published in one rename; its tokenizer is checked
    against clipforge's on probe texts before it is.
    """
    model, tokenizer, meta = load_checkpoint(ckpt)
    check_exportable(model, tokenizer)
    transformers = _transformers()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf_model = transformers.CLIPModel(hf_config(model.cfg, tokenizer)).eval()
        hf_model.load_state_dict(state_to_hf(model), strict=True)
        hf_model.save_pretrained(str(tmp))
        _write_tokenizer(tokenizer, model.cfg, tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(model.cfg), indent=2),
                                                      encoding="utf-8")
        theirs = transformers.CLIPTokenizer.from_pretrained(str(tmp))
        for text in _PROBE_TEXTS:
            ours = tokenizer.encode(text)[0].tolist()
            if theirs(text, truncation=True, max_length=model.cfg.max_seq_len)["input_ids"] != ours[: ours.index(
                    tokenizer.eot_id) + 1]:
                raise ConfigError(f"cannot export to transformers: its CLIPTokenizer splits {text!r} differently")
        (tmp / "clipforge_source.json").write_text(json.dumps(
            {"content_hash": meta.get("content_hash"), "source": meta.get("source")}, indent=2), encoding="utf-8")
        publish_directory(tmp, out)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
