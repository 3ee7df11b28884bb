"""clipforge <-> transformers CLIPModel: configs, state dicts and preprocessing settings.

The mapping is exact: a CLIPModel's ViT towers are clipforge towers with q/k/v fused into
one projection, QuickGELU or GELU, LayerNorm eps 1e-5, learned positions, CLS pooling after
ln_post and pooling at the first end-of-text token; the preprocessing is transformers'
CLIPImageProcessor. interop reaches transformers only through load_transformers (model.hf_towers imports it).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from model.clip import CLIP
from model.config import CLIPConfig
from model.errors import CheckpointError, ClipforgeError, ConfigError
from model.hf_towers import transformers_module
from model.tokenizer import CLIPTokenizer

RESAMPLE_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as preprocessor_config.json stores it


def load_transformers() -> Any:
    """transformers, quiet (model.hf_towers imports it so), or one line naming the extra hf: interop needs."""
    try:
        return transformers_module()
    except ClipforgeError as exc:
        raise ClipforgeError("hf: interop needs transformers: pip install 'clipforge[hf]'") from exc


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


def hf_config(cfg: CLIPConfig, tokenizer: CLIPTokenizer) -> Any:
    transformers = load_transformers()
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
        "size": {"shortest_edge": cfg.image_resize_size or cfg.img_size}, "resample": RESAMPLE_BICUBIC,
        "do_center_crop": True, "crop_size": {"height": cfg.img_size, "width": cfg.img_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std),
    }
